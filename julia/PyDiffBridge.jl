# PyDiffBridge.jl: the Julia side of pydiffbridge's Julia backend.
#
# pydiffbridge/_julia/runtime.py includes this file into a module of its own
# (PyDiffBridgeHost), never into Main, and calls the functions below through juliacall:
#
#   api_version()                     -> Int, checked by the Python side
#   algorithm(name)                   -> an OrdinaryDiffEq algorithm from its name
#   solve_ode(f, u0, ts, tend, name; ...)
#       f(du, u, t) is a Python callable writing dy/dt into the Julia vector du (a view on
#       the Python side: no copies); returns (t, u, retcode, nf, naccept, nreject)
#   solve_ensemble_src(src, fname, u0s, ps, ts, name; ...)
#       many trajectories of a right-hand side written in Julia source, with EnsembleThreads
#       on the CPU or DiffEqGPU's EnsembleGPUKernel on a CUDA device
#
# It needs OrdinaryDiffEq, SciMLBase and StaticArrays (pydiffbridge/juliapkg.json) and, for
# GPU ensembles only, DiffEqGPU and CUDA (the optional "gpu" set), loaded on demand.

module PyDiffBridge

using OrdinaryDiffEq
using StaticArrays
import SciMLBase

const API_VERSION = 1

api_version() = API_VERSION

# Implicit and Rosenbrock methods differentiate f for their Jacobian.  A Python callback
# cannot take ForwardDiff dual numbers, so those methods use finite differences.
function finite_diff(ctor)
    if isdefined(OrdinaryDiffEq, :AutoFiniteDiff)
        try
            return ctor(; autodiff = OrdinaryDiffEq.AutoFiniteDiff())
        catch
        end
    end
    return ctor(; autodiff = false)
end

const ALGORITHMS = Dict{String,Function}(
    "Euler" => () -> Euler(),
    "Midpoint" => () -> Midpoint(),
    "Heun" => () -> Heun(),
    "RK4" => () -> RK4(),
    "BS3" => () -> BS3(),
    "DP5" => () -> DP5(),
    "Tsit5" => () -> Tsit5(),
    "DP8" => () -> DP8(),
    "Vern6" => () -> Vern6(),
    "Vern7" => () -> Vern7(),
    "Vern8" => () -> Vern8(),
    "Vern9" => () -> Vern9(),
    "Rosenbrock23" => () -> finite_diff(Rosenbrock23),
    "Rodas4" => () -> finite_diff(Rodas4),
    "Rodas5" => () -> finite_diff(Rodas5),
    "Rodas5P" => () -> finite_diff(Rodas5P),
    "KenCarp4" => () -> finite_diff(KenCarp4),
    "Kvaerno5" => () -> finite_diff(Kvaerno5),
    "TRBDF2" => () -> finite_diff(TRBDF2),
    "RadauIIA5" => () -> finite_diff(RadauIIA5),
    "FBDF" => () -> finite_diff(FBDF),
    "QNDF" => () -> finite_diff(QNDF),
    "AutoTsit5(Rosenbrock23())" => () -> AutoTsit5(finite_diff(Rosenbrock23)),
    "AutoVern7(Rodas5())" => () -> AutoVern7(finite_diff(Rodas5)),
)

const FIXED_STEP = Set(["Euler", "Midpoint", "RK4"])

function algorithm(name::AbstractString)
    ctor = get(ALGORITHMS, String(name), nothing)
    if ctor === nothing
        known = join(sort(collect(keys(ALGORITHMS))), ", ")
        throw(ArgumentError("unknown algorithm $(name); known: $(known)"))
    end
    return ctor()
end

retcode_name(rc) = String(Symbol(rc))

_tol(x::Number) = Float64(x)
_tol(x) = Vector{Float64}(collect(x))

_opt(x) = x === nothing ? nothing : Float64(x)

function _stats(sol)
    st = hasproperty(sol, :stats) ? sol.stats : nothing
    if st === nothing
        return (0, 0, 0)
    end
    return (Int(st.nf), Int(st.naccept), Int(st.nreject))
end

# kwargs that are only passed when given, so OrdinaryDiffEq keeps its own defaults
function _step_kwargs(dt, dtmax, dtmin)
    kw = Dict{Symbol,Any}()
    if dt !== nothing
        kw[:dt] = Float64(dt)
    end
    if dtmax !== nothing
        kw[:dtmax] = Float64(dtmax)
    end
    if dtmin !== nothing
        kw[:dtmin] = Float64(dtmin)
    end
    return kw
end

"""
    solve_ode(f, u0, ts, tend, name; reltol, abstol, event, nevent, dt, dtmax, dtmin,
              maxiters, tstops, jumps, fixed)

Integrate du/dt = f(u, t) from `ts[1]` to `tend`, saving at the times `ts`.  `f(du, u, t)`
writes into `du` in place.  With `event` (a callable `event(out, u, t)` writing `nevent`
values), the first zero crossing of any component terminates the solve and only the initial
and terminal states are returned.  Returns a named tuple `(t, u, retcode, nf, naccept,
nreject)` with `u` of size `length(u0) × length(t)`.
"""
function solve_ode(f, u0, ts, tend, name; reltol = 1e-7, abstol = 1e-9, event = nothing,
                   nevent = 0, dt = nothing, dtmax = nothing, dtmin = nothing,
                   maxiters = 100_000, tstops = Float64[], jumps = Float64[], fixed = false)
    u0v = collect(u0)
    times = Vector{Float64}(collect(ts))
    rhs! = function (du, u, p, t)
        f(du, u, t)
        return nothing
    end
    prob = ODEProblem(rhs!, u0v, (times[1], Float64(tend)))
    alg = algorithm(name)
    kw = _step_kwargs(dt, dtmax, dtmin)
    stops = sort(unique(vcat(Vector{Float64}(collect(tstops)), Vector{Float64}(collect(jumps)))))
    if !isempty(stops)
        kw[:tstops] = stops
    end
    if !isempty(jumps)
        kw[:d_discontinuities] = Vector{Float64}(collect(jumps))
    end
    if fixed
        kw[:adaptive] = false
    end
    if event === nothing
        sol = solve(prob, alg; saveat = times, reltol = _tol(reltol), abstol = _tol(abstol),
                    maxiters = Int(maxiters), kw...)
    else
        condition! = function (out, u, t, integrator)
            event(out, u, t)
            return nothing
        end
        affect! = function (integrator, idx)
            terminate!(integrator)
            return nothing
        end
        cb = VectorContinuousCallback(condition!, affect!, Int(nevent);
                                      save_positions = (false, false))
        sol = solve(prob, alg; callback = cb, saveat = times[1:1], save_end = true,
                    reltol = _tol(reltol), abstol = _tol(abstol), maxiters = Int(maxiters), kw...)
    end
    nf, nacc, nrej = _stats(sol)
    u = isempty(sol.u) ? zeros(eltype(u0v), length(u0v), 0) : reduce(hcat, sol.u)
    return (t = Vector{Float64}(sol.t), u = u, retcode = retcode_name(sol.retcode), nf = nf,
            naccept = nacc, nreject = nrej)
end

# ---------------------------------------------------------------------------------------
# Ensembles of a right-hand side written in Julia source

const GPU_ALGORITHMS = Dict{String,Symbol}(
    "Tsit5" => :GPUTsit5,
    "Vern7" => :GPUVern7,
    "Vern9" => :GPUVern9,
    "Rosenbrock23" => :GPURosenbrock23,
    "Rodas4" => :GPURodas4,
    "Rodas5P" => :GPURodas5P,
)

"""
    load_rhs(src, fname)

Evaluate `src` in a fresh module (StaticArrays loaded, not Main) and return the function
`fname`, an out-of-place `f(u, p, t)` returning an SVector, a tuple or a vector.
"""
function load_rhs(src::AbstractString, fname::AbstractString)
    m = Module(gensym(:PyDiffBridgeUserRHS))
    Core.eval(m, :(using StaticArrays))
    Base.include_string(m, String(src), "pydiffbridge-rhs")
    if !isdefined(m, Symbol(fname))
        throw(ArgumentError("the Julia source does not define a function $(fname)"))
    end
    return Base.invokelatest(getfield, m, Symbol(fname))
end

static_rhs(f, ::Val{N}) where {N} = (u, p, t) -> SVector{N}(Tuple(f(u, p, t)))

function _gpu_solve(eprob, name, ntraj, saveat, reltol, abstol, maxiters)
    Core.eval(@__MODULE__, :(using DiffEqGPU, CUDA))
    return Base.invokelatest(_gpu_solve_loaded, eprob, name, ntraj, saveat, reltol, abstol,
                             maxiters)
end

function _gpu_solve_loaded(eprob, name, ntraj, saveat, reltol, abstol, maxiters)
    sym = get(GPU_ALGORITHMS, String(name), nothing)
    if sym === nothing
        known = join(sort(collect(keys(GPU_ALGORITHMS))), ", ")
        throw(ArgumentError("method $(name) has no GPU kernel version; use one of: $(known)"))
    end
    dg = getfield(@__MODULE__, :DiffEqGPU)
    cuda = getfield(@__MODULE__, :CUDA)
    alg = getfield(dg, sym)()
    ens = dg.EnsembleGPUKernel(cuda.CUDABackend())
    return solve(eprob, alg, ens; trajectories = ntraj, saveat = saveat, reltol = reltol,
                 abstol = abstol, maxiters = maxiters)
end

"""
    solve_ensemble_src(src, fname, u0s, ps, ts, name; reltol, abstol, gpu, maxiters)

Solve `size(u0s, 2)` trajectories of the right-hand side `fname` defined in `src`, one per
column of `u0s` (and of `ps`, or no parameters when `ps === nothing`), saving at `ts`.
Returns `(u, retcodes, nf)`: `u` of size `n × length(ts) × ntraj`.
"""
function solve_ensemble_src(src, fname, u0s, ps, ts, name; reltol = 1e-6, abstol = 1e-8,
                            gpu = false, maxiters = 100_000)
    U = Matrix(collect(u0s))
    T = eltype(U)
    P = ps === nothing ? zeros(T, 0, size(U, 2)) : Matrix{T}(collect(ps))
    times = Vector{T}(collect(ts))
    user_f = load_rhs(src, fname)
    # the user's function is newer than this method: call it in the latest world
    return Base.invokelatest(_solve_ensemble, user_f, U, P, times, name, reltol, abstol, gpu,
                             Int(maxiters))
end

function _solve_ensemble(user_f, U, P, times, name, reltol, abstol, gpu, maxiters)
    n, ntraj = size(U)
    T = eltype(U)
    np_ = size(P, 1)
    f = static_rhs(user_f, Val(n))
    u0_1 = SVector{n,T}(Tuple(U[:, 1]))
    p_1 = SVector{np_,T}(Tuple(P[:, 1]))
    prob = ODEProblem{false}(f, u0_1, (times[1], times[end]), p_1)
    prob_func = function (prob, i, repeat)
        return remake(prob; u0 = SVector{n,T}(Tuple(U[:, i])), p = SVector{np_,T}(Tuple(P[:, i])))
    end
    eprob = EnsembleProblem(prob; prob_func = prob_func, safetycopy = false)
    if gpu
        esol = _gpu_solve(eprob, name, ntraj, times, T(reltol), T(abstol), maxiters)
    else
        esol = solve(eprob, algorithm(name), EnsembleThreads(); trajectories = ntraj,
                     saveat = times, reltol = reltol, abstol = abstol, maxiters = maxiters)
    end
    out = fill(T(NaN), n, length(times), ntraj)
    codes = Vector{String}(undef, ntraj)
    nfs = zeros(Int, ntraj)
    for (i, sol) in enumerate(esol.u)
        m = min(length(sol.u), length(times))
        for j in 1:m
            out[:, j, i] .= sol.u[j]
        end
        codes[i] = retcode_name(sol.retcode)
        nfs[i] = _stats(sol)[1]
    end
    return (u = out, retcodes = codes, nf = nfs)
end

end # module PyDiffBridge

"""Tests of the ODE-Net example (examples/odenet_mnist.py) and its data loading."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pydiffbridge.errors import InputError
from pydiffbridge.nn._data import load_dataset, load_digits_data, load_idx_dir, read_idx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "odenet_mnist.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("odenet_mnist_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist_dir(d: Path, gz: bool, n_train: int = 7, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 6)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 6)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            with gzip.open(d / (name + ".gz"), "wb") as fh:
                fh.write(raw)
        else:
            (d / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_roundtrip(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist_dir(tmp_path, gz)
    data = load_idx_dir(tmp_path)
    assert data.x_train.shape == (7, 1, 4, 6) and data.x_test.shape == (5, 1, 4, 6)
    np.testing.assert_allclose(data.x_train[:, 0].numpy() * 255.0,
                               arrays["train-images-idx3-ubyte"], atol=1e-4)
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    same = load_dataset("dir", data_dir=tmp_path)
    torch.testing.assert_close(same.x_test, data.x_test)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(InputError, match="not an idx file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(InputError, match="truncated"):
        read_idx(short)
    with pytest.raises(InputError, match="no file"):
        load_idx_dir(tmp_path)
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("cifar")


def test_digits_fallback_split() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = load_digits_data()
    ref = sklearn_datasets.load_digits()
    assert len(data.y_train) + len(data.y_test) == len(ref.target) == 1797
    assert data.image_shape == (1, 8, 8)
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    # the split is a partition: label counts add up to the dataset's
    counts = torch.bincount(data.y_train, minlength=10) + torch.bincount(data.y_test, minlength=10)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(ref.target))
    sub = data.subset(50, 20)
    assert len(sub.y_train) == 50 and len(sub.y_test) == 20


def test_fashion_files_if_installed() -> None:
    from pydiffbridge.nn._data import FASHION_DIR

    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))  # balanced test set


def test_paper_parameter_counts(example) -> None:
    # Counted by hand for 28x28 inputs and 64 channels.
    stem = (1 * 9 * 64 + 64) + 128 + (64 * 64 * 16 + 64) + 128 + (64 * 64 * 16 + 64)
    head = 128 + (64 * 10 + 10)
    odefunc = 3 * 128 + 2 * (65 * 64 * 9 + 64)
    resblock = 2 * 128 + 2 * 64 * 64 * 9
    expected = {"mlp": 784 * 300 + 300 + 300 * 10 + 10, "resnet": stem + 6 * resblock + head,
                "rknet": stem + odefunc + head, "odenet": stem + odefunc + head}
    for kind, n in expected.items():
        assert example.n_params(example.build_model(kind, (1, 28, 28))) == n, kind
    assert abs(expected["odenet"] / 1e6 - 0.22) < 0.02
    assert abs(expected["resnet"] / 1e6 - 0.60) < 0.03


def test_memory_tracker_counts_saved_activations(example) -> None:
    # 8 linear layers of width 64 on a batch of 32: forward keeps 8 float32 activations of
    # 32 x 64 for backward (8 * 8 KiB) plus 8 weight gradients (8 * 16 KiB) at the end.
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64, bias=False) for _ in range(8)]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(32, 64)
    meter = example.LiveTensorBytes()
    with meter:
        model(x).sum().backward()
    act, wgrad = 32 * 64 * 4, 64 * 64 * 4
    assert meter.peak >= 7 * act  # the saved activations
    assert meter.peak <= 8 * act + 8 * wgrad + 4 * act + 4 * wgrad  # small transients only
    assert meter.current >= 8 * wgrad  # the weight gradients stay alive


@pytest.mark.slow
def test_example_end_to_end_digits(example, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--dataset", "digits", "--subset", "48", "--test-subset", "32", "--batch-size", "16",
            "--epochs", "1", "--tolerances", "0.1,0.0001", "--memory-sweep", "--sweep-steps",
            "1,16", "--sweep-batch", "16", "--out", str(out), "--no-progress", "--device", "cpu"]
    example.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["mlp", "resnet", "rknet", "odenet"]
    for r in res["rows"]:
        assert 0.0 <= r["test_error"] <= 100.0 and r["peak_mem_mib"] > 0
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["rknet"]["nfe_forward"] == 16 and rows["rknet"]["nfe_backward"] == 0
    assert rows["odenet"]["nfe_backward"] > 0
    tight, loose = rows["odenet"]["adaptive"][1], rows["odenet"]["adaptive"][0]
    assert tight["nfe_forward"] > loose["nfe_forward"]
    sweep = {s["steps"]: s for s in res["memory_sweep"]}
    # direct backprop stores every stage; the adjoint does not grow with the step count
    assert sweep[16]["rknet_mib"] > 1.5 * sweep[1]["rknet_mib"]
    assert sweep[16]["odenet_mib"] < 1.2 * sweep[1]["odenet_mib"]
    assert sweep[16]["odenet_mib"] < sweep[16]["rknet_mib"]
    for name in ("results.md", "adaptive_computation.png", "memory_vs_steps.png",
                 "ckpt_odenet.pt"):
        assert (out / name).stat().st_size > 0
    assert "| odenet |" in (out / "results.md").read_text()

    # --resume continues from the saved epoch instead of starting over
    example.main(["--dataset", "digits", "--subset", "48", "--test-subset", "32",
                  "--batch-size", "16", "--epochs", "2", "--tolerances", "0.1",
                  "--model", "odenet", "--resume", "--out", str(out), "--no-progress",
                  "--device", "cpu"])
    ckpt = torch.load(out / "ckpt_odenet.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 2 and len(ckpt["state"]["epoch_times"]) == 2
    assert len(ckpt["state"]["nfe"]) == 2 * 3  # 48 images / batch 16 = 3 steps per epoch

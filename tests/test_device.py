import pytest
import torch

from models.device import resolve_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_bad_names():
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")


@pytest.mark.cuda
def test_cuda_resolves():
    assert resolve_device("cuda").type == "cuda"

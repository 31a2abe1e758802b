"""to_device: the same values, and no copy where the tensor already lives."""

import torch

from lfm_ray.transfer import to_device


def test_a_cpu_tensor_stays_itself_on_the_cpu():
    t = torch.arange(5)
    assert to_device(t, "cpu") is t
    assert to_device(t, torch.device("cpu")).data_ptr() == t.data_ptr()


def test_values_and_dtype_survive_the_copy():
    t = torch.tensor([0.25, -1.5], dtype=torch.float64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = to_device(t, device)
    assert out.device.type == device and out.dtype == torch.float64
    assert torch.equal(out.cpu(), t)

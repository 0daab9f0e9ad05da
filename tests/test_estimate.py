"""The throughput model before training (pure logic; tests/test_train.py measures it against a run)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tuneloom.trainer.estimate import (
    ASSUMED_GPU_UTILISATION,
    CPU_FLOPS_PER_CORE,
    DEVICES,
    QLORA_DEQUANT_FACTOR,
    Workload,
    count_parameters,
    device_for_name,
    estimate,
    format_duration,
)

N = 134_515_008  # SmolLM2-135M


def _workload(method: str = "lora", **changes) -> Workload:
    fields = {"parameters": N, "method": method, "tokens_per_epoch": 27_485, "epochs": 2, "steps": 30}
    return Workload(**{**fields, **changes})


def test_the_cpu_is_calibrated_on_the_bench_figure() -> None:
    """bench/README.md: 174.8 tokens/s for SmolLM2-135M LoRA on 2 cores; the model gives it back."""
    assert pytest.approx(4 * N * 174.8 / 2) == CPU_FLOPS_PER_CORE
    one_second = estimate(_workload(tokens_per_epoch=1748, epochs=1), DEVICES["cpu"], devices=2)
    assert one_second.seconds == pytest.approx(10.0)
    assert (one_second.gpu_seconds, one_second.cost) == (0.0, None)


def test_full_costs_six_n_lora_four_n_and_qlora_its_dequantisation_more() -> None:
    lora = estimate(_workload("lora"), DEVICES["h100"], devices=1).seconds
    assert estimate(_workload("full"), DEVICES["h100"], devices=1).seconds == pytest.approx(lora * 6 / 4)
    assert estimate(_workload("qlora"), DEVICES["h100"], devices=1).seconds == pytest.approx(
        lora * QLORA_DEQUANT_FACTOR
    )
    assert lora == pytest.approx(4 * N * 54_970 / (989e12 * ASSUMED_GPU_UTILISATION))
    assert "QLoRA dequantisation x1.35 assumed" in estimate(_workload("qlora"), DEVICES["h100"], devices=1).basis
    # DPO on a 4-bit base (dpo.qlora) pays the same dequantisation on DPO's own compute.
    dpo = estimate(_workload("dpo"), DEVICES["h100"], devices=1).seconds
    quantized_dpo = estimate(_workload("dpo", quantized=True), DEVICES["h100"], devices=1).seconds
    assert quantized_dpo == pytest.approx(dpo * QLORA_DEQUANT_FACTOR)


def test_validation_passes_cost_a_forward_pass_each_epoch() -> None:
    plain = estimate(_workload(), DEVICES["a100"], devices=1).seconds
    with_validation = estimate(_workload(validation_tokens_per_epoch=27_485), DEVICES["a100"], devices=1).seconds
    assert with_validation == pytest.approx(plain * 1.5)


def test_more_gpus_take_less_time_for_the_same_gpu_seconds_and_cost() -> None:
    one = estimate(_workload(), DEVICES["l4"], devices=1, price_per_gpu_hour=0.8)
    four = estimate(_workload(), DEVICES["l4"], devices=4, price_per_gpu_hour=0.8)
    assert four.seconds == pytest.approx(one.seconds / 4)
    assert four.gpu_seconds == pytest.approx(one.gpu_seconds) == pytest.approx(one.seconds)
    assert four.cost == pytest.approx(one.seconds / 3600 * 0.8, rel=1e-3)
    assert four.to_status() == {"tokens": 54_970, "steps": 30, "seconds": round(four.seconds, 1), "cost": four.cost}


def test_the_lines_say_tokens_steps_time_cost_and_basis() -> None:
    cpu, h100 = (estimate(_workload(), DEVICES[name], devices=2, price_per_gpu_hour=2.5) for name in ("cpu", "h100"))
    assert cpu.lines()[0] == "training tokens: 27,485 per epoch, 54,970 in total; 30 optimizer steps"
    assert cpu.lines()[1].startswith("estimated time on cpu (2 cores): 5m15s; cost: no GPU time (calibrated")
    assert h100.lines()[1].startswith("estimated time on 2 x h100: 1s; cost: ")
    assert "at the price given (peak dense bf16 989 TFLOP/s, utilisation assumed)" in h100.lines()[1]


def test_device_names_as_torch_reports_them() -> None:
    assert device_for_name("NVIDIA H100 80GB HBM3") is DEVICES["h100"]
    assert device_for_name("NVIDIA A100-SXM4-80GB") is DEVICES["a100"]
    assert device_for_name("NVIDIA L4") is DEVICES["l4"]
    with pytest.raises(ValueError, match="unknown device 'NVIDIA L40S'; known: h100, h200, a100, l4, cpu"):
        device_for_name("NVIDIA L40S")


def test_bad_workloads_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        estimate(_workload("dora"), DEVICES["cpu"], devices=1)
    with pytest.raises(ValueError, match="devices must be >= 1, got 0"):
        estimate(_workload(), DEVICES["h100"], devices=0)


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header = {"__metadata__": {"format": "pt"}}
    header |= {name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_parameters_are_counted_from_every_shards_header(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model-00001-of-00002.safetensors", {"embed": [10, 4], "norm": [4]})
    _safetensors(tmp_path / "model-00002-of-00002.safetensors", {"proj": [4, 4, 2]})
    assert count_parameters(tmp_path) == 40 + 4 + 32
    with pytest.raises(ValueError, match=r"no \*\.safetensors files"):
        count_parameters(tmp_path / "empty")


def test_the_real_smollm2_count(smollm2_dir: Path) -> None:
    assert count_parameters(smollm2_dir) == N


def test_durations() -> None:
    assert [format_duration(s) for s in (0.2, 59.5, 75, 3600 * 2 + 61)] == ["1s", "1m00s", "1m15s", "2h01m"]

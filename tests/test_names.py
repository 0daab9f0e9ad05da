"""Pure logic: adapter identities, the names a client may send, and the CPU LoRA kernel fix."""

from __future__ import annotations

import pytest

from tuneloom.names import AdapterId
from tuneloom.serving.names import ForbiddenNamespace, InvalidAdapterName, parse_model

OWN = frozenset({"team-a"})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("pirate", AdapterId("team-a", "pirate")),
        ("pirate@3", AdapterId("team-a", "pirate", "3")),
        ("team-a/pirate@12", AdapterId("team-a", "pirate", "12")),
    ],
)
def test_names_parse(model: str, expected: AdapterId) -> None:
    assert parse_model(model, "team-a", OWN) == expected


@pytest.mark.parametrize("model", ["", "../secrets", "a/../b", "Pirate", "pirate@0", "pirate@v2", "pirate@", "x" * 64])
def test_malformed_names_are_refused_with_the_accepted_forms(model: str) -> None:
    with pytest.raises(InvalidAdapterName, match=r"NAME@VERSION|must name"):
        parse_model(model, "team-a", OWN)


def test_another_namespace_needs_permission() -> None:
    with pytest.raises(ForbiddenNamespace, match="team-a"):
        parse_model("team-b/pirate", "team-a", OWN)
    assert parse_model("team-b/pirate", "team-a", OWN | {"team-b"}) == AdapterId("team-b", "pirate")


def test_one_identity_formats_every_name() -> None:
    pinned = AdapterId("ns", "a", "2")
    assert (pinned.served_name, pinned.key, pinned.store_prefix, str(pinned)) == (
        "ns/a@2",
        "ns/a",
        "adapters/ns/a/2",
        "ns/a@2",
    )
    assert AdapterId("ns", "a").store_prefix == "adapters/ns/a"
    assert AdapterId("ns", "a").pinned("3") == AdapterId("ns", "a", "3")
    with pytest.raises(ValueError, match="unpinned"):
        _ = AdapterId("ns", "a").served_name


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        ("ns/a@2", AdapterId("ns", "a", "2")),
        ("ns/a", None),  # not pinned
        ("a@2", None),  # no namespace
        ("tiny-base", None),  # a base model
        ("HuggingFaceTB/SmolLM2-135M-Instruct", None),
        ("ns/a@0", None),
        ("ns/a/b@1", None),
    ],
)
def test_served_names_are_recognised_exactly(listed: str, expected: AdapterId | None) -> None:
    assert AdapterId.parse_served(listed) == expected


def test_cpu_fix_leaves_tokens_without_an_adapter_untouched() -> None:
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from tuneloom.serving import cpu_lora_fix

    weights = torch.randn(2, 1, 4, 8)  # two adapters, rank 4, hidden 8
    inputs = torch.randn(3, 8)
    indices = torch.tensor([0, -1, 1])
    unfixed = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(inputs, weights, unfixed, indices)
    assert unfixed[1].abs().sum() > 0, "the bug: index -1 picks the last adapter"
    cpu_lora_fix.install()
    cpu_lora_fix.install()  # idempotent
    fixed = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(inputs, weights, fixed, indices)
    assert torch.equal(fixed[1], torch.zeros(4))
    assert torch.allclose(fixed[[0, 2]], unfixed[[0, 2]])
    expanded = torch.ones(3, 8)
    lora_ops.bgmv_expand(torch.randn(3, 4), torch.randn(2, 1, 8, 4), expanded, indices, add_inputs=True)
    assert torch.equal(expanded[1], torch.ones(8))

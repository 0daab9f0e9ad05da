"""AdapterGates: an unload of an adapter never overlaps a request for it (pure asyncio logic; the
vLLM test in test_serving.py drives the same gates under real traffic)."""

from __future__ import annotations

import asyncio

from tuneloom.serving.middleware import AdapterGates


async def _hold(gates: AdapterGates, name: str | None, log: list[str], label: str, release: asyncio.Event) -> None:
    async with gates.shared(name):
        log.append(f"{label} started")
        await release.wait()
        log.append(f"{label} done")


async def _unload(gates: AdapterGates, name: str, log: list[str]) -> None:
    async with gates.exclusive(name):
        log.append("unload")


async def _busy_then_unloading(
    gates: AdapterGates, log: list[str], label: str, release: asyncio.Event
) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """A request for ns/a@1 in flight until `release`, and an unload of ns/a@1 waiting behind it."""
    request = asyncio.create_task(_hold(gates, "ns/a@1", log, label, release))
    await asyncio.sleep(0)
    unload = asyncio.create_task(_unload(gates, "ns/a@1", log))
    await asyncio.sleep(0)
    return request, unload


def test_an_unload_waits_for_requests_in_flight() -> None:
    async def scenario() -> list[str]:
        gates, log, release = AdapterGates(), [], asyncio.Event()
        request, unload = await _busy_then_unloading(gates, log, "request", release)
        await asyncio.sleep(0.01)
        assert log == ["request started"], "the unload went ahead of a running request"
        release.set()
        await asyncio.gather(request, unload)
        return log

    assert asyncio.run(scenario()) == ["request started", "request done", "unload"]


def test_requests_arriving_during_an_unload_wait_for_it() -> None:
    async def scenario() -> list[str]:
        gates, log = AdapterGates(), []
        first_release, late_release = asyncio.Event(), asyncio.Event()
        first, unload = await _busy_then_unloading(gates, log, "first", first_release)
        late = asyncio.create_task(_hold(gates, "ns/a@1", log, "late", late_release))
        await asyncio.sleep(0.01)
        assert "late started" not in log, "a request slipped in while the unload waited"
        first_release.set()
        await unload
        late_release.set()
        await asyncio.gather(first, late)
        return log

    assert asyncio.run(scenario()) == ["first started", "first done", "unload", "late started", "late done"]


def test_the_base_model_and_other_adapters_never_wait() -> None:
    async def scenario() -> list[str]:
        gates, log, release = AdapterGates(), [], asyncio.Event()
        busy, unload = await _busy_then_unloading(gates, log, "a", release)
        free = asyncio.Event()
        free.set()
        await asyncio.wait_for(_hold(gates, None, log, "base", free), timeout=1)
        await asyncio.wait_for(_hold(gates, "ns/b@1", log, "b", free), timeout=1)
        release.set()
        await asyncio.gather(busy, unload)
        return log

    log = asyncio.run(scenario())
    assert log.index("base done") < log.index("a done") and log.index("b done") < log.index("unload")

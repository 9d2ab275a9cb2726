"""The task context: save/restore of PF_MEMALLOC, softirq, waiting states, trio inheritance."""

from __future__ import annotations

import trio

from emu.kernel.sched import TaskFlags, all_tasks, current, memalloc_noreclaim, softirq, task, waiting


def test_memalloc_noreclaim_restores_previous_value() -> None:
    with task("t") as t:
        assert not t.flags & TaskFlags.PF_MEMALLOC
        with memalloc_noreclaim():
            assert t.flags & TaskFlags.PF_MEMALLOC
            with memalloc_noreclaim():  # nested save/restore keeps it set
                pass
            assert t.flags & TaskFlags.PF_MEMALLOC
        assert not t.flags & TaskFlags.PF_MEMALLOC
    with task("k", TaskFlags.PF_MEMALLOC) as k:
        with memalloc_noreclaim():
            pass
        assert k.flags & TaskFlags.PF_MEMALLOC  # it had it before: stays


def test_softirq_and_waiting_restore() -> None:
    with task("nic") as t:
        with softirq():
            assert current().in_softirq
            with softirq():
                pass
            assert current().in_softirq
        assert not t.in_softirq
        with waiting("D reclaim", "try_to_free_pages"):
            assert (t.state, t.wchan) == ("D reclaim", "try_to_free_pages")
        assert (t.state, t.wchan) == ("R", "")


def test_task_registry_lists_live_tasks() -> None:
    with task("listed") as t:
        assert t in all_tasks()
    assert t not in all_tasks()


async def test_trio_children_inherit_current() -> None:
    seen = []

    async def child() -> None:
        seen.append(current().comm)

    with task("parent"):
        async with trio.open_nursery() as n:
            n.start_soon(child)
    async with trio.open_nursery() as n:
        n.start_soon(child)
    assert seen == ["parent", "swapper"]

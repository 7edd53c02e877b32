"""rpc/child.py: one child on the loop, cancelled at any point without leaving anything."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from spotfi_bridge.rpc.child import MAX_ARG_STRLEN, ArgumentTooLong, run_child, spawn_detached
from tests.helpers.fake_ubus import process_gone, run
from tests.helpers.wait import until, wait_for

SCRIPT = 'sleep 300 & echo $! > "$0"; wait'


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 5, 8])
def test_cancelled_while_starting_ends_the_whole_group_at_once(tmp_path: Path,
                                                               yields: int) -> None:
    """asyncio's own clean-up of a start cancelled half-way kills only the leader and, on
    3.11, can wait forever: cancelled after a few loop turns, run_child must still end."""
    pidfile = tmp_path / f"grandchild-{yields}.pid"

    async def body() -> None:
        task = asyncio.ensure_future(run_child(["/bin/sh", "-c", SCRIPT, str(pidfile)],
                                               timeout=30, output_cap=1024))
        for _ in range(yields):
            await asyncio.sleep(0)  # a loop turn, not a wait for time
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=15)
        assert done, "run_child did not end after its cancellation"

    run(body)
    assert psutil.Process().children() == []
    if pidfile.exists() and pidfile.read_text().strip():
        pid = int(pidfile.read_text())
        wait_for(lambda: process_gone(pid), 5, f"grandchild {pid} to die")


def test_argument_over_max_arg_strlen_is_refused_before_exec(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def body() -> None:
        await run_child(["/bin/sh", "-c", f': > "{marker}"', "x" * MAX_ARG_STRLEN],
                        timeout=5, output_cap=1024)

    with pytest.raises(ArgumentTooLong) as raised:
        run(body)
    assert (raised.value.index, raised.value.size) == (3, MAX_ARG_STRLEN)
    assert not marker.exists()


def test_death_by_signal_is_told_apart_from_an_exit_status() -> None:
    async def body() -> tuple[object, ...]:
        killed = await run_child(["/bin/sh", "-c", "kill -TERM $$"], timeout=5, output_cap=64)
        exited = await run_child(["/bin/sh", "-c", "exit 143"], timeout=5, output_cap=64)
        return killed.returncode, killed.signal, exited.returncode, exited.signal

    assert run(body) == (143, 15, 143, None)


def test_a_detached_child_is_reaped_when_it_ends_before_us(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def body() -> None:
        pid = spawn_detached(["/bin/sh", "-c", f': > "{marker}"'])
        assert os.getsid(pid) == pid  # its own session: our process group's fate is not its
        await until(lambda: psutil.Process().children() == [], "the detached child reaped", 10)

    run(body)
    assert marker.exists()

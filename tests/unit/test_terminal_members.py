"""members.py on real processes: a session whose jobs have process groups of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Iterator

import pytest

from spotfi_bridge.terminal.members import members, signal_members
from tests.fuzz.procfs import alive, comm, state
from tests.helpers.wait import wait_for

# What a shell with job control leaves in its session: a job in a group of its own, one
# that ignores SIGHUP, a zombie nobody waits for; and a process that left with setsid.
LEADER = r"""
import subprocess, sys, time
own = subprocess.Popen(["sleep", "1000"], process_group=0)
nohup = subprocess.Popen(["sh", "-c", 'trap "" HUP; exec sleep 1001'], process_group=0)
gone = subprocess.Popen(["sleep", "1002"], start_new_session=True)
zombie = subprocess.Popen(["true"])
print(own.pid, nohup.pid, gone.pid, zombie.pid, flush=True)
time.sleep(1000)
"""


class Session:
    def __init__(self) -> None:
        self.leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE,
                                       start_new_session=True)
        assert self.leader.stdout is not None
        line = self.leader.stdout.readline().split()
        self.own, self.nohup, self.gone, self.zombie = (int(word) for word in line)
        wait_for(lambda: comm(self.nohup) == "sleep" and state(self.zombie) == "Z", 10,
                 "jobs running, the zombie dead")

    def close(self) -> None:
        for pid in (self.own, self.nohup, self.gone):
            if alive(pid) and os.getsid(pid) in (self.leader.pid, self.gone):
                os.kill(pid, signal.SIGKILL)
        self.leader.kill()
        self.leader.wait(10)
        assert self.leader.stdout is not None
        self.leader.stdout.close()


@pytest.fixture
def session() -> Iterator[Session]:
    started = Session()
    yield started
    started.close()


def test_members_are_the_session_whatever_their_group_without_zombies(
        session: Session) -> None:
    sid = session.leader.pid
    found = dict(members(sid))
    assert set(found) == {sid, session.own, session.nohup}
    assert found[sid] == sid and found[session.own] == session.own
    assert found[session.nohup] == session.nohup
    assert session.gone not in found and session.zombie not in found


def test_signal_members_reaches_other_groups_only(session: Session) -> None:
    sid = session.leader.pid
    # the leader's own group is the caller's to killpg; the rest get the signal
    assert signal_members(sid, signal.SIGKILL) == 2
    wait_for(lambda: not alive(session.own) and not alive(session.nohup), 10, "both jobs dead")
    assert alive(sid), "the leader's group was signalled"
    assert alive(session.gone), "a process outside the session was signalled"
    assert members(sid) == [(sid, sid)]


def test_a_pid_that_left_the_session_since_the_scan_is_not_signalled(
        session: Session) -> None:
    """As if a member died after the scan and its pid went to a process elsewhere."""
    assert signal_members(session.leader.pid, signal.SIGKILL,
                          [(session.gone, session.gone)]) == 0
    assert alive(session.gone)

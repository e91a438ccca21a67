"""StopRequests under torch.distributed: one periodic save per period, not one more at the step after."""
import socket

import torch.distributed as dist

import util.preemption as preemption


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_periodic_save_is_asked_once_per_period(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "time", lambda: now[0])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        requests = preemption.StopRequests(save_every_minutes=1)
        decisions = []
        for step in range(8):
            now[0] += 20.0  # a step every 20 s: due after 3 steps
            preempt, periodic = requests.poll()
            decisions.append(periodic)
            if periodic:
                requests.saved()
        # the decision of a step is the exchange started at the step before (one step late, on every rank alike)
        assert decisions == [False, False, False, True, False, False, False, True]
    finally:
        dist.destroy_process_group()

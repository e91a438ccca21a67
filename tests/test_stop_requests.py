"""StopRequests under torch.distributed: one periodic save per period, not one more at the step after; requests travel
over the main process group."""
import builtins
import socket

import torch.distributed as dist

import util.misc as misc
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


def test_stop_requests_travel_over_the_main_group(monkeypatch):
    """No side group (a gloo group binds to what the host name resolves to, which on many clusters its peers cannot
    reach: creating it hangs); a stop signal is acted on at the step after the one it arrived in."""
    def no_new_group(*args, **kwargs):
        raise AssertionError("StopRequests created a process group")

    monkeypatch.setattr(dist, "new_group", no_new_group)
    exchanged = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: exchanged.append((t.device.type, kw.get("group"))) or
                        all_reduce(t, **kw))
    handlers = {sig: preemption.signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    monkeypatch.setattr(builtins, "print", builtins.print)
    misc.setup_for_distributed(True)  # the print(force=...) of main_jit.py's processes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        requests = preemption.StopRequests(save_every_minutes=0)
        decisions = [requests.poll()]
        preemption.signal.raise_signal(preemption.signal.SIGUSR1)  # arrives during the next step
        decisions += [requests.poll(), requests.poll()]
        assert decisions == [(False, False), (False, False), (True, False)]
        assert exchanged == [("cpu", None)] * 2  # the default group; none started once the ranks agreed to stop
    finally:
        dist.destroy_process_group()
        for sig, handler in handlers.items():
            preemption.signal.signal(sig, handler)

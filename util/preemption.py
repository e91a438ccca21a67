"""Stop requests: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job) and --save_every_minutes.

Every rank must save and stop at the same step: see StopRequests. Under torchrun, a SIGTERM to the launcher is
forwarded to every rank, which then has 30 s (torchrun's grace period) to finish its step and save.
This module imports torch only where it is used: main_jit.py installs exit_during_startup before importing torch.
"""
import os
import signal
import time

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a job script can requeue on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _exit_preempted(signum, frame):
    print(f"received {signal.Signals(signum).name} during start-up: nothing to save; exiting with status "
          f"{PREEMPTED_EXIT_CODE}", flush=True)
    os._exit(PREEMPTED_EXIT_CODE)


def exit_during_startup():
    """Until StopRequests takes over, a stop signal ends the process with PREEMPTED_EXIT_CODE (requeue), not the
    default 143: imports, data scanning and resuming take tens of seconds on a cold node, and a job stopped then
    has nothing to save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_preempted)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: a job-wide SIGTERM must not kill the loader workers before the main process
    has saved its checkpoint (they exit with their parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_loader_workers():
    """atexit: stop the DataLoader workers with SIGINT (a worker ends its loop cleanly on KeyboardInterrupt). They
    ignore SIGTERM (ignore_stop_signals), which is how multiprocessing's own exit handler stops them before waiting
    for them: any exit with live workers (preemption, a bad image, ...) would otherwise wait forever. Registered
    after multiprocessing's handler, so it runs first."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            os.kill(child.pid, signal.SIGINT)


class StopRequests:
    """Agreement of every rank on when to save and stop, polled once per training step.

    Ranks exchange their flags with an asynchronous all_reduce on a CPU (gloo) group: started at one step and read
    at the next, so it neither waits on the GPU nor stalls the step; all ranks act on the same step.
    """

    def __init__(self, save_every_minutes):
        import torch.distributed as dist  # imported here, not at the top: see the module docstring

        import util.misc as misc

        self.signal_received = None
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.time()
        self.group = dist.new_group(backend="gloo") if misc.is_dist_avail_and_initialized() else None
        self.pending = None  # (work, flags tensor) of the exchange started at the previous step
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signal.Signals(signum).name
        print(f"received {self.signal_received}: saving a checkpoint after the current step", force=True)

    def saved(self):
        self.last_save = time.time()

    def _local_flags(self):
        from util.misc import is_main_process

        time_due = self.save_every_s is not None and time.time() - self.last_save >= self.save_every_s
        return [int(self.signal_received is not None), int(time_due and is_main_process())]

    def poll(self):
        """(preempt, periodic_save), the same on every rank."""
        import torch
        import torch.distributed as dist

        if self.group is None:
            preempt, periodic = self._local_flags()
            return bool(preempt), bool(periodic)
        decision = (False, False)
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            decision = (bool(flags[0]), bool(flags[1]))
            if decision[1]:  # the caller saves at this step: the exchange started below must not ask for it again
                self.last_save = time.time()
        self.pending = None
        if not decision[0]:
            flags = torch.tensor(self._local_flags(), dtype=torch.int32)
            self.pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flags)
        return decision

"""Stop requests: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job) and --save_every_minutes.

Every rank must save and stop at the same step, so the decision is one tiny all_reduce every `check_every` steps
(a host sync there only); a single process checks its flags at every step for free.
"""
import signal
import time

import torch
import torch.distributed as dist

import util.misc as misc

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a job script can requeue on it


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: a job-wide SIGTERM must not kill the loader workers before the main process
    has saved its checkpoint (they exit with their parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; main_jit.py exits with PREEMPTED_EXIT_CODE."""


class StopRequests:
    def __init__(self, save_every_minutes, device, check_every=10):
        self.signal_received = None
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.time()
        self.device = device
        self.check_every = check_every if misc.is_dist_avail_and_initialized() else 1
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signal.Signals(signum).name
        print(f"received {self.signal_received}: saving a checkpoint after the current step", force=True)

    def saved(self):
        self.last_save = time.time()

    def poll(self, step):
        """(preempt, periodic_save) agreed by every rank; evaluated every check_every steps."""
        if (step + 1) % self.check_every != 0:
            return False, False
        time_due = self.save_every_s is not None and time.time() - self.last_save >= self.save_every_s
        flags = [self.signal_received is not None, time_due and misc.is_main_process()]
        if misc.is_dist_avail_and_initialized():
            flags = torch.tensor(flags, dtype=torch.int32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.tolist()
        return bool(flags[0]), bool(flags[1])

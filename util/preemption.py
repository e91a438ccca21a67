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

    Ranks exchange their flags with an all_reduce on the main process group (no side group: a gloo group binds to
    whatever the host name resolves to, often 127.0.1.1 or a management interface on a cluster, where creating it
    blocks for 30 minutes). The exchange started at one step is read at the next, so every rank acts on the same
    step. Under NCCL the flags live on the GPU: the all_reduce is queued on the current stream, not waited for by
    the host, and the result comes back to pinned host memory behind a CUDA event, so the host runs at most one step
    ahead of the GPU and never waits for the step in flight. Under gloo the same calls run on CPU tensors (the
    all_reduce returns when the exchange is done: every rank has just left the step's gradient all-reduce).
    """

    def __init__(self, save_every_minutes):
        import torch  # imported here, not at the top: see the module docstring
        import torch.distributed as dist

        import util.misc as misc

        self.signal_received = None
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.time()
        self.distributed = misc.is_dist_avail_and_initialized()
        on_gpu = self.distributed and dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        # the exchange's buffers, made once: every step reuses them (poll reads the previous result before the next
        # exchange overwrites it). Pinned + non_blocking: a copy from pageable memory would wait for every kernel
        # queued on the stream
        self.send = torch.zeros(2, dtype=torch.int32, pin_memory=on_gpu)
        self.flags = torch.zeros(2, dtype=torch.int32, device=device)
        self.received = torch.zeros(2, dtype=torch.int32, pin_memory=on_gpu)
        self.copied = torch.cuda.Event() if on_gpu else None  # recorded after the copy into self.received
        self.pending = False  # whether an exchange started at the previous step awaits reading
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

    def _start_exchange(self):
        """All-reduce (max) of every rank's flags, its result copied into host memory once it is there."""
        import torch.distributed as dist

        self.send[0], self.send[1] = self._local_flags()
        self.flags.copy_(self.send, non_blocking=True)
        dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)  # NCCL: the stream waits, not the host
        self.received.copy_(self.flags, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.pending = True

    def poll(self):
        """(preempt, periodic_save), the same on every rank."""
        if not self.distributed:
            preempt, periodic = self._local_flags()
            return bool(preempt), bool(periodic)
        decision = (False, False)
        if self.pending:
            if self.copied is not None:
                self.copied.synchronize()  # the previous step's exchange: long done unless the GPU is a step behind
            decision = (bool(self.received[0]), bool(self.received[1]))
            if decision[0] and self.signal_received is None:  # named in this rank's exit line
                self.signal_received = "a stop signal to another rank"
            if decision[1]:  # the caller saves at this step: the exchange started below must not ask for it again
                self.last_save = time.time()
        self.pending = False
        if not decision[0]:
            self._start_exchange()
        return decision

"""JiT training and evaluation entry point: `torchrun --nproc_per_node=N main_jit.py ...` or `python main_jit.py ...`."""
import os
import sys
import time

from util.preemption import exit_during_startup

if __name__ == "__main__":
    exit_during_startup()  # before the slow imports and data scanning: a SIGTERM then exits 75 (requeue), not 143

import torch

import util.misc as misc
from denoiser import Denoiser
from engine_jit import evaluate_sweep, train_one_epoch, validate
from text_conditioning import trainable_llm_warning
from util import fid
from util.args import check_config, get_args_parser, is_text_model
from util.checkpoint import (check_resume_compatible, choose_checkpoint, continue_point, load_checkpoint,
                             read_on_every_rank, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from util.data import UnreadableImage
from util.datasets import build_train_loader, build_val_loader, training_data
from util.finetune import finetune
from util.preemption import PREEMPTED_EXIT_CODE, StopRequests
from util.tracking import RunLog


def load_fid_stats(args):
    """The --fid_stats statistics (default: ImageNet's at --img_size), read once for every evaluation of the run,
    before any work: a missing file stops the run now, not after hours of training."""
    args.fid_stats = args.fid_stats or fid.default_stats_path(args.img_size)
    try:
        return fid.load_stats(args.fid_stats)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--fid_stats: {e}")


def resume(args, model_without_ddp, optimizer, path):
    """Load checkpoint `path` (None: a fresh start, or --finetune's weights); returns the (epoch, step) to continue at
    (ours carry their mid-epoch position and every rank's RNG states, official ones continue at the next epoch) and
    the W&B run the checkpoint's run logged to (None: none, or only evaluating)."""
    if path is None:
        if args.evaluate_gen:
            print(f"--evaluate_gen without --resume: evaluating the initial (untrained) weights of --seed {args.seed}")
        elif args.finetune:
            finetune(args, model_without_ddp)
        return args.start_epoch, 0, None
    if args.finetune and not args.evaluate_gen:
        print(f"--finetune {args.finetune} not used: continuing the run of {path}")
    checkpoint = read_on_every_rank(path)  # once: it holds the weights, both EMA tracks and the optimizer state
    try:
        check_resume_compatible(args, path, checkpoint.get("args"))
        load_checkpoint(model_without_ddp, path, checkpoint)
    except ValueError as e:
        raise SystemExit(str(e))
    epoch, step = continue_point(checkpoint)
    if args.evaluate_gen:
        print(f"evaluating {path} (epoch {checkpoint['epoch']})")
        return epoch, step, None
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    state = checkpoint.get("resume_state")
    if state is not None:
        if len(state["rng"]) == misc.get_world_size():
            set_rng_state(state["rng"][misc.get_rank()])
        else:
            print(f"world size changed ({len(state['rng'])} -> {misc.get_world_size()}): RNG streams restart")
    print(f"resumed from {path} (epoch {checkpoint['epoch']}); continuing at epoch {epoch} step {step}")
    return epoch, step, getattr(checkpoint.get("args"), "wandb_id", None)  # none in older and official checkpoints


def save_for_resume(args, model_without_ddp, optimizer, stop_requests, epoch, next_step, steps_per_epoch,
                    name="last"):
    """Checkpoint to continue at (epoch, next_step), collective (every rank's RNG states); True on every rank when it
    was written, False after a failed write (reported in one line; the previous checkpoint stays)."""
    # its official `epoch` is the last complete epoch: the original code restarts an unfinished one
    if not all(torch.isfinite(p).all() for p in model_without_ddp.parameters()):  # same weights on every rank
        raise SystemExit(f"non-finite weights at epoch {epoch} step {next_step}: training stopped before any "
                         f"checkpoint was written with these weights")
    rng = [rng_state()]
    if misc.is_dist_avail_and_initialized():
        rng = [None] * misc.get_world_size()
        torch.distributed.all_gather_object(rng, rng_state())
    complete = next_step == steps_per_epoch
    resume_state = {"epoch": epoch + 1 if complete else epoch, "step": 0 if complete else next_step, "rng": rng}
    written = [True]
    if misc.is_main_process():
        path = os.path.join(args.output_dir, f"checkpoint-{name}.pth")
        try:
            save_checkpoint(path, model_without_ddp, optimizer, epoch if complete else epoch - 1, args, resume_state)
        except OSError as e:
            kept = "the previous one is kept unchanged" if os.path.exists(path) else "there is no previous one"
            print(f"ERROR: could not write {path} ({e.strerror or e}); {kept}", force=True)
            written = [False]
    if misc.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(written, src=0)  # every rank reports (and exits) alike
    if stop_requests is not None:
        stop_requests.saved()  # a failed periodic save is retried one period later, not at every step
    return written[0]


def exit_preempted(signal_name, epoch, next_step, written):
    """After the preemption checkpoint: exit with PREEMPTED_EXIT_CODE (requeue) when it was written, else with 1 (a
    requeued run would not continue from this step)."""
    where = f"preempted ({signal_name}) at epoch {epoch} step {next_step}"
    if not written:
        raise SystemExit(f"{where}: checkpoint-last.pth could not be written (see the error above); exiting with "
                         f"status 1")
    print(f"{where}: checkpoint-last.pth saved; exiting with status {PREEMPTED_EXIT_CODE}", force=True)
    sys.exit(PREEMPTED_EXIT_CODE)


def distribute(model, device):
    """DDP, which broadcasts rank 0's weights, and rank 0's EMA tracks, which are not module state (each rank built its
    own from its seed; online evaluation samples from them on every rank). The release copies its EMA after DDP."""
    # gradients as views of the allreduce buckets (one copy of the gradients, not two); no buffer broadcast before
    # every forward: the only buffers are constant tables (RoPE; a trainable LLM's rotary frequencies)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True, forward_sync_buffers=False)
    broadcast_from_rank0([tensor for track in model.ema_params for tensor in track])
    return ddp


def broadcast_from_rank0(tensors):
    for tensor in tensors:
        torch.distributed.broadcast(tensor, src=0)


def main(args):
    check_config(args)
    ref_stats = load_fid_stats(args) if args.evaluate_gen or args.online_eval else None
    checkpoint_path = choose_checkpoint(args)  # before any work: a run that must not start stops here
    device = misc.resolve_device(args.device, args.gpu if args.distributed else None)
    args.precision = misc.resolve_precision(args.precision, device)
    misc.configure_kernels(args, device)
    misc.keep_freed_cpu_memory(device)
    misc.seed_everything(args.seed + misc.get_rank())
    if misc.is_main_process():
        remove_stale_temporaries(args.output_dir)

    model = Denoiser(args).to(device)
    if args.compile:
        misc.compile_network(model.net)  # before DDP wraps the model (below)
    model_without_ddp = model
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {num_params / 1e6:.2f}M trainable parameters")
    if is_text_model(args) and not args.freeze_llm:
        print(trainable_llm_warning(model.net.y_embedder.encoder.llm))

    eff_batch_size = args.batch_size * misc.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    if not args.evaluate_gen:
        print(f"lr {args.lr:.2e} (blr {args.blr:.2e}, effective batch {eff_batch_size})")
    optimizer = misc.build_optimizer(model_without_ddp, args.lr, args.weight_decay, device)
    start_epoch, start_step, wandb_id = resume(args, model_without_ddp, optimizer, checkpoint_path)
    run_log = None
    if misc.is_main_process():
        run_log = RunLog(args, wandb_id)
        args.wandb_id = run_log.wandb_id  # saved with the args in every checkpoint: a resumed run continues its W&B run
    if args.evaluate_gen and checkpoint_path is None and args.distributed:  # every rank samples rank 0's init
        broadcast_from_rank0([p.data for p in model.parameters()] + [t for track in model.ema_params for t in track])

    dataset, val_samples, eval_label_ids = training_data(args, model_without_ddp)

    inception = None
    if args.evaluate_gen or args.online_eval:
        # its construction draws random initial weights: not from the training RNG, which resume() has just restored
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            inception = fid.load_inception(args.inception_weights, device)
    if args.evaluate_gen:
        # as the release: the samples follow --seed (seed + rank), not the training RNG saved in the checkpoint
        torch.manual_seed(args.seed + misc.get_rank())
        evaluate_sweep(model_without_ddp, args, start_epoch - 1, run_log, device, inception, ref_stats,
                       eval_label_ids)
        if run_log is not None:
            run_log.close()
        return

    data_loader = build_train_loader(args, dataset)
    steps_per_epoch = data_loader.sampler.num_samples // args.batch_size
    val_loader = build_val_loader(args, val_samples) if val_samples is not None else None
    if args.distributed:
        # after compile_network, as the release: DDP wraps a Denoiser whose blocks are compiled, so dynamo compiles
        # each block's forward and backward and never traces DDP. DDP's hooks then allreduce a gradient bucket as
        # soon as the compiled backwards of its blocks have run (overlap block by block), and dynamo's DDPOptimizer,
        # which splits a compiled DDP module at bucket boundaries, has nothing to split (optimize_ddp False).
        model = distribute(model_without_ddp, device)
    stop_requests = StopRequests(args.save_every_minutes)

    def save(epoch, next_step, name="last"):  # collective; True when the checkpoint was written
        return save_for_resume(args, model_without_ddp, optimizer, stop_requests, epoch, next_step, steps_per_epoch,
                               name)

    print(f"training epochs {start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    last_written = True  # whether the latest checkpoint-last.pth write (the last epoch's, at the end) succeeded
    for epoch in range(start_epoch, args.epochs):
        step = start_step if epoch == start_epoch else 0
        while step < steps_per_epoch:  # train_one_epoch returns before the epoch's end when the ranks agree to save
            # a new loader iterator from `step` yields the batches an unbroken epoch would: the sampler's order is
            # seeded by the epoch, the crop is deterministic and the flip is drawn on the device
            data_loader.sampler.set_epoch(epoch, start_index=step * args.batch_size)
            try:
                why, step = train_one_epoch(model, model_without_ddp, data_loader, optimizer, device, epoch,
                                            run_log, args, start_step=step, stop_requests=stop_requests)
            except UnreadableImage as e:  # the one-line message, without the (worker's) traceback
                raise SystemExit(e.line) from None
            if why != "done":
                written = save(epoch, step)
            if why == "preempted":
                exit_preempted(stop_requests.signal_received, epoch, step, written)
        # the next step sets new gradients: free these before validation, saving and sampling (under DDP they are
        # views of its gradient buckets, which stay: gradient_as_bucket_view)
        optimizer.zero_grad(set_to_none=True)
        if val_loader is not None:
            validate(model_without_ddp, val_loader, device, epoch, run_log, args, (epoch + 1) * steps_per_epoch)
        last_epoch = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last_epoch:
            last_written = save(epoch, steps_per_epoch)
        if epoch % 100 == 0 and epoch > 0:
            save(epoch, steps_per_epoch, name=str(epoch))
        if args.online_eval and (epoch % args.eval_freq == 0 or last_epoch):
            # as the release: the allocator's cached training blocks go back to the GPU before sampling, and the
            # sampling blocks before training resumes (a no-op unless CUDA is in use)
            torch.cuda.empty_cache()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                evaluate_sweep(model_without_ddp, args, epoch, run_log, device, inception, ref_stats,
                               eval_label_ids)
            torch.cuda.empty_cache()
        if run_log is not None:
            run_log.flush()
    if run_log is not None:
        run_log.close()
    print(f"training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start_time))}")
    if not last_written:
        raise SystemExit(f"the final checkpoint-last.pth of epoch {args.epochs - 1} could not be written "
                         f"(see the error above)")


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args()
    with misc.distributed_mode(cli_args):  # joins the ranks; closes the process group on every way out of main
        main(cli_args)

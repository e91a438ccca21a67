"""One training epoch and one evaluation (sampling + FID/IS) of a JiT Denoiser."""
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

import util.misc as misc
from util import fid
from util.args import is_text_model
from util.images import png_name, save_grid, save_png, save_prompt_list, to_uint8
from util.lr_sched import adjust_learning_rate

EVALUATIONS = "evaluations.jsonl"  # in --output_dir: one JSON object per evaluation, appended


def to_model_input(images_uint8, device):
    """uint8 (B, 3, H, W) from the loader -> float32 in [-1, 1] on the device (the loader ships bytes, not floats)."""
    return images_uint8.to(device, non_blocking=True).float().div_(255).mul_(2).sub_(1)


def check_finite(first_bad_step, epoch):
    """Stop (on every rank) when a non-finite loss was seen; called at logging points, never per step."""
    if misc.is_dist_avail_and_initialized():
        dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
    if first_bad_step.item() < 2 ** 62:
        raise SystemExit(f"non-finite loss at epoch {epoch} step {first_bad_step.item()}: training stopped "
                         f"before any checkpoint was written with these weights")


def random_flip(x):
    """Horizontal flip of half the batch, drawn from the training RNG (checkpointed, so resumes are exact)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


def train_step(model, model_without_ddp, optimizer, x, labels, precision):
    """One optimisation step on a device batch: loss (autocast), backward, AdamW, both EMA tracks. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)  # before the forward: the last step's gradients never sit beside activations
    with misc.autocast(x.device, precision):
        loss = model(x, labels)
    loss.backward()
    optimizer.step()
    model_without_ddp.update_ema()
    return loss.detach()


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, device, epoch, run_log, args,
                    start_step=0, stop_requests=None):
    """Train from step start_step of the epoch until its end, or until the ranks agree (stop_requests, polled after
    every step) to save: returns (why, next_step), why being "done", "save" (--save_every_minutes) or "preempted"."""
    model.train(True)
    steps_per_epoch = data_loader.sampler.num_samples // args.batch_size
    no_bad_step = 2 ** 62
    first_bad_step = torch.tensor(no_bad_step, device=device)
    loss_sum = torch.zeros((), device=device)
    interval_start, interval_steps = time.time(), 0
    for step, (images, labels) in enumerate(data_loader, start=start_step):
        lr = adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        x = to_model_input(images, device)
        if not args.no_hflip:
            x = random_flip(x)
        labels = labels.to(device, non_blocking=True)
        loss = train_step(model, model_without_ddp, optimizer, x, labels, args.precision)
        first_bad_step = torch.where(torch.isfinite(loss) | (first_bad_step < no_bad_step), first_bad_step, step)
        loss_sum += loss
        interval_steps += 1
        if (step + 1) % args.log_freq == 0 or step + 1 == steps_per_epoch:
            check_finite(first_bad_step, epoch)
            mean_loss = misc.all_reduce_mean(loss_sum / interval_steps).item()
            elapsed = time.time() - interval_start
            images_per_s = interval_steps * args.batch_size * misc.get_world_size() / elapsed
            steps_left = (steps_per_epoch - step - 1) + (args.epochs - epoch - 1) * steps_per_epoch
            eta = datetime.timedelta(seconds=int(steps_left * elapsed / interval_steps))
            print(f"Epoch [{epoch}] [{step + 1}/{steps_per_epoch}] loss {mean_loss:.6f} lr {lr:.3e} "
                  f"{images_per_s:.1f} img/s ETA {eta}")
            if run_log is not None:
                global_step = epoch * steps_per_epoch + step + 1
                run_log.scalar("train_loss", mean_loss, global_step)
                run_log.scalar("lr", lr, global_step)
            loss_sum.zero_()
            interval_start, interval_steps = time.time(), 0
        if stop_requests is not None:
            preempt, periodic = stop_requests.poll()
            if preempt or periodic:
                check_finite(first_bad_step, epoch)  # the caller saves: never a checkpoint with diverged weights
                return "preempted" if preempt else "save", step + 1
    return "done", steps_per_epoch


@torch.no_grad()
def validation_loss(model_without_ddp, data_loader, device, args):
    """(mean v-loss, image count) over the validation set: every rank's share (data_loader.sampler lists its indices
    in the set), summed over the ranks. Sample i's label drop, time and noise come from a generator seeded with i, drawn in the
    training order, so the value depends only on the weights and the set (not on the epoch, the world size or the
    batch size) and the training RNG is untouched (exact resume). Dropout is off (eval mode); no flip."""
    model = model_without_ddp
    was_training = model.training
    model.eval()
    indices = list(data_loader.sampler)
    generator = torch.Generator(device=device)
    total, count = 0.0, 0
    for images, labels in data_loader:
        x = to_model_input(images, device)
        u, t, noise = [], [], []
        for index in indices[count:count + len(x)]:
            generator.manual_seed(index)
            u.append(torch.rand(1, device=device, generator=generator))
            t.append(model.sample_t(1, device=device, generator=generator))
            noise.append(torch.randn(x.shape[1:], device=device, generator=generator))
        labels = model.drop_labels(labels.to(device, non_blocking=True), u=torch.cat(u))
        with misc.autocast(device, args.precision):
            loss = model(x, labels, t=torch.cat(t), noise=torch.stack(noise) * model.noise_scale)
        total += loss.item() * len(x)
        count += len(x)
    model.train(was_training)
    sums = torch.tensor([total, count], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if misc.is_dist_avail_and_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item(), int(sums[1].item())


def validate(model_without_ddp, data_loader, device, epoch, run_log, args, global_step):
    """validation_loss, printed and logged to TensorBoard as val_loss at the training step it follows."""
    start = time.time()
    loss, count = validation_loss(model_without_ddp, data_loader, device, args)
    print(f"Epoch [{epoch}] val_loss {loss:.6f} ({count} validation images, {time.time() - start:.1f} s)")
    if run_log is not None:
        run_log.scalar("val_loss", loss, global_step)
    return loss


def eval_labels(num_images, label_ids, rank, world_size):
    """This rank's share of num_images labels cycling through label_ids (classes, or caption indices of -Text
    models): class-balanced when num_images is a multiple of the class count, and every batch (and the sample
    grid) shows many classes."""
    label_ids = torch.as_tensor(label_ids)
    return label_ids[torch.arange(num_images) % len(label_ids)][rank::world_size]


@torch.no_grad()
def generate_uint8(model_without_ddp, labels, device, args, on_batch, desc="sampling", cfg=None):
    """Sample images for `labels` in batches of gen_bsz with guidance scale cfg (default: the model's);
    on_batch(uint8 images (B, 3, S, S) on CPU, labels)."""
    model_without_ddp.eval()
    batches = labels.split(args.gen_bsz)
    steps = model_without_ddp.num_sampling_steps
    with misc.progress_bar(total=len(batches) * steps, desc=f"{desc} ({len(batches)} x {steps} steps)", unit="step",
              disable=not misc.is_main_process()) as bar:
        for batch_labels in batches:
            with misc.autocast(device, args.precision):
                images = model_without_ddp.generate(batch_labels.to(device), cfg=cfg, on_step=bar.update)
            on_batch(to_uint8(images).cpu(), batch_labels)


def gather_to_main(tensor):
    """Concatenate each rank's CPU tensor on rank 0 (others get None); the identity in a single process."""
    if not misc.is_dist_avail_and_initialized():
        return tensor
    parts = [None] * misc.get_world_size() if misc.is_main_process() else None
    dist.gather_object(tensor, parts, dst=0)
    return torch.cat(parts) if misc.is_main_process() else None


def append_evaluation(output_dir, record):
    """One evaluation's results as a line of <output_dir>/evaluations.jsonl (what demos and scripts read)."""
    with open(os.path.join(output_dir, EVALUATIONS), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_evaluations(output_dir):
    """The records of <output_dir>/evaluations.jsonl, oldest first ([] when the run evaluated nothing)."""
    path = os.path.join(output_dir, EVALUATIONS)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(model_without_ddp, args, epoch, run_log, device, inception, ref_stats, label_ids, cfg=None,
             ema_track=None):
    """FID (against ref_stats) and IS of num_images samples cycling through label_ids, with an EMA track; on rank 0
    printed, logged (TensorBoard, W&B) and appended to evaluations.jsonl. --save_png writes the images (README)."""
    cfg = args.cfg if cfg is None else cfg
    ema_track = args.eval_ema if ema_track is None else ema_track
    rank, world_size = misc.get_rank(), misc.get_world_size()
    labels = eval_labels(args.num_images, label_ids, rank, world_size)
    text = is_text_model(args)
    captions = model_without_ddp.net.y_embedder.captions if text else None
    tag = f"epoch{epoch}_cfg{cfg:g}_ema{ema_track}"
    png_dir = os.path.join(args.output_dir, f"images_{tag}") if args.save_png else None
    if png_dir:
        os.makedirs(png_dir, exist_ok=True)
        if text and misc.is_main_process():
            prompt_indices = [n % len(label_ids) for n in range(args.num_images)]
            save_prompt_list(png_dir, [png_name(n, k, text) for n, k in enumerate(prompt_indices)],
                             [captions[label_ids[k]] for k in prompt_indices])
    pool_features, logits, grid, grid_labels = [], [], [], []
    done = [0]  # images this rank has generated so far

    def on_batch(images, batch_labels):
        pool, batch_logits = fid.inception_features(inception, images)
        pool_features.append(pool)
        if batch_logits is not None:
            logits.append(batch_logits)
        room = 64 - sum(len(g) for g in grid)
        if room > 0:
            grid.append(images[:room])
            grid_labels.extend(batch_labels[:room].tolist())
        if png_dir:
            for image, label in zip(images, batch_labels.tolist()):
                index = rank + world_size * done[0]  # the index of this image in the global label list
                save_png(image, os.path.join(png_dir, png_name(index, index % len(label_ids) if text else label, text)))
                done[0] += 1

    with model_without_ddp.ema_weights(ema_track):
        generate_uint8(model_without_ddp, labels, device, args, on_batch, desc=f"eval {tag}", cfg=cfg)

    pool_features = gather_to_main(torch.cat(pool_features))
    logits = gather_to_main(torch.cat(logits)) if logits else None
    if not misc.is_main_process():
        return None
    grid_path = os.path.join(args.output_dir, f"samples_{tag}.png")
    save_grid(torch.cat(grid), grid_path, [captions[i] for i in grid_labels] if text else None)
    metrics = fid.compute_metrics(pool_features, logits, ref_stats, inception.source)
    print(f"[{tag}] {fid.format_metrics(metrics, len(pool_features), grid_path)}")
    append_evaluation(args.output_dir, {"epoch": epoch, "cfg": cfg, "ema": ema_track, "num_images": len(pool_features),
                                        **metrics, "grid": grid_path, "images": png_dir})
    if run_log is not None:
        run_log.epoch_scalar(f"fid_cfg{cfg:g}_ema{ema_track}", metrics["fid"], epoch)
        if metrics["inception_score"] is not None:
            run_log.epoch_scalar(f"is_cfg{cfg:g}_ema{ema_track}", metrics["inception_score"], epoch)
        run_log.epoch_image(f"samples_cfg{cfg:g}_ema{ema_track}", grid_path, epoch,
                            caption=f"epoch {epoch}, cfg {cfg:g}, EMA {ema_track}: FID {metrics['fid']:.2f}")
    return metrics


def evaluate_sweep(model_without_ddp, args, epoch, run_log, device, inception, ref_stats, label_ids):
    """Evaluate every (cfg, EMA track) pair of --sweep_cfg x --sweep_ema (defaults: --cfg x --eval_ema)."""
    results = []
    for ema_track in args.sweep_ema or [args.eval_ema]:
        for cfg in args.sweep_cfg or [args.cfg]:
            metrics = evaluate(model_without_ddp, args, epoch, run_log, device, inception, ref_stats, label_ids, cfg,
                               ema_track)
            results.append((cfg, ema_track, metrics))
    if misc.is_main_process() and len(results) > 1:
        print("cfg    ema   FID       IS")
        for cfg, ema_track, m in results:
            isc = "n/a" if m["inception_score"] is None else f"{m['inception_score']:.2f}"
            print(f"{cfg:<6g} {ema_track:<5d} {m['fid']:<9.4f} {isc}")
    return results

import math


def learning_rate(epoch, args):
    """LR at a fractional epoch: linear warm-up from 0, then constant or half-cycle cosine down to min_lr."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if args.lr_schedule == "constant":
        return args.lr
    fraction = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def adjust_learning_rate(optimizer, epoch, args):
    lr = learning_rate(epoch, args)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr

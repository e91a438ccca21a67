"""Where a run's figures go: TensorBoard in --output_dir, always, and Weights & Biases with --wandb_project."""
from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """Rank 0's log: the same scalars to TensorBoard and, with --wandb_project, to a W&B run whose config is the run's
    flags. Training scalars (train_loss, lr, val_loss) are on the training-step axis, evaluation ones (fid_*, is_*) and
    sample grids on the epoch axis, as TensorBoard shows them; W&B gets the axis as a field ("step", "epoch") so that
    both series stay in order. wandb_id: the W&B run of the checkpoint being resumed, which continues."""

    def __init__(self, args, wandb_id=None):
        self.tensorboard = SummaryWriter(log_dir=args.output_dir)
        self.wandb = None
        if args.wandb_project:
            import wandb  # optional: util/args.check_config stops with the install command when it is missing

            self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_name,
                                    mode=args.wandb_mode, dir=args.output_dir, config=vars(args), id=wandb_id,
                                    resume="allow" if wandb_id else None)
            for axis in ("step", "epoch"):
                self.wandb.define_metric(axis)
            for pattern in ("fid_*", "is_*", "samples_*"):
                self.wandb.define_metric(pattern, step_metric="epoch")
            for name in ("train_loss", "lr", "val_loss"):
                self.wandb.define_metric(name, step_metric="step")

    @property
    def wandb_id(self):
        return None if self.wandb is None else self.wandb.id

    def scalar(self, tag, value, step):
        """A training scalar at training step `step`."""
        self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value, "step": step})

    def epoch_scalar(self, tag, value, epoch):
        """An evaluation scalar of epoch `epoch`."""
        self.tensorboard.add_scalar(tag, value, epoch)
        if self.wandb is not None:
            self.wandb.log({tag: value, "epoch": epoch})

    def epoch_image(self, tag, path, epoch, caption=None):
        """An evaluation's sample grid (a PNG file), to W&B (TensorBoard keeps the scalars; the grid is in the folder)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(path, caption=caption), "epoch": epoch})

    def flush(self):
        self.tensorboard.flush()

    def close(self):
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

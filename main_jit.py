"""JiT training and evaluation entry point: `torchrun --nproc_per_node=N main_jit.py ...` or `python main_jit.py ...`."""
import argparse

from model_jit import ATTN_IMPLS, JiT_models


def get_args_parser():
    parser = argparse.ArgumentParser("JiT", add_help=True)
    # model
    parser.add_argument("--model", default="JiT-B/16", type=str, choices=sorted(JiT_models), help="model config")
    parser.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    parser.add_argument("--attn_dropout", default=0.0, type=float, help="attention-probability dropout (middle blocks)")
    parser.add_argument("--proj_dropout", default=0.0, type=float, help="projection / SwiGLU dropout (middle blocks)")
    parser.add_argument("--attn_impl", default="sdpa", choices=ATTN_IMPLS,
                        help="sdpa: fused attention kernel; fp32: the release's float32 logits and softmax")
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
    parser.add_argument("--label_drop_prob", default=0.1, type=float, help="label dropout for CFG training")
    parser.add_argument("--seed", default=0, type=int, help="process seed = seed + rank")
    parser.add_argument("--start_epoch", default=0, type=int)
    parser.add_argument("--num_workers", default=12, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    # sampling
    parser.add_argument("--sampling_method", default="heun", choices=["euler", "heun"])
    parser.add_argument("--num_sampling_steps", default=50, type=int)
    parser.add_argument("--cfg", default=1.0, type=float, help="classifier-free guidance scale")
    parser.add_argument("--interval_min", default=0.0, type=float, help="CFG applies for interval_min < t ...")
    parser.add_argument("--interval_max", default=1.0, type=float, help="... and t < interval_max")
    # evaluation
    parser.add_argument("--num_images", default=50000, type=int, help="number of images generated for FID/IS")
    parser.add_argument("--eval_freq", default=40, type=int, help="online evaluation every this many epochs")
    parser.add_argument("--online_eval", action="store_true", help="evaluate FID/IS during training")
    parser.add_argument("--evaluate_gen", action="store_true", help="only evaluate the resumed checkpoint")
    parser.add_argument("--gen_bsz", default=256, type=int, help="generation batch size per process")
    # data, output, resume
    parser.add_argument("--data_path", default="./data/imagenet", type=str)
    parser.add_argument("--class_num", default=1000, type=int)
    parser.add_argument("--output_dir", default="./output_dir", help="where checkpoints and logs go")
    parser.add_argument("--resume", default="", help="checkpoint folder or .pth file to resume from")
    parser.add_argument("--save_last_freq", default=5, type=int, help="write checkpoint-last.pth every N epochs")
    parser.add_argument("--log_freq", default=100, type=int, help="log every N iterations")
    parser.add_argument("--device", default="cuda", help="cuda, cpu or mps")
    # distributed
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser

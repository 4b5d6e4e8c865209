"""LoRA fine-tuning with a fast attention backend: scripts/train_lora.py through accelerate.

    python examples/train_lora_fast_backend.py                          # tiny UNet, 4 images, CPU
    python examples/train_lora_fast_backend.py --model PATH --data DIR --backend flash \\
        -- --resolution 1024 --mixed_precision bf16 --gradient_checkpointing --max_train_steps 1000

Without --data it writes a 4-image dataset (imagefolder + metadata.jsonl) to a temp folder.
Anything after ``--`` goes to train_lora.py unchanged.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser()
parser.add_argument("--model", help="local diffusers model folder (default: --tiny sd)")
parser.add_argument("--data", help="imagefolder with metadata.jsonl (default: 4 generated images)")
parser.add_argument("--backend", default="sdpa", help="attnpatch backend for the denoiser")
parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("rest", nargs="*", help="extra train_lora.py flags (after --)")
args = parser.parse_args()

work = pathlib.Path(tempfile.mkdtemp(prefix="lora-example-"))
data = pathlib.Path(args.data) if args.data else work / "data"
if not args.data:
    data.mkdir()
    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220),
              "yellow": (230, 210, 40)}
    with open(data / "metadata.jsonl", "w") as f:
        for i, (name, rgb) in enumerate(colors.items()):
            Image.new("RGB", (64, 64), rgb).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {name} square"}) + "\n")
out = args.out or str(work / "lora")

model = ["--pretrained_model_name_or_path", args.model] if args.model else ["--tiny", "sd"]
defaults = [] if args.rest else ["--resolution", "32", "--max_train_steps", "4",
                                 "--learning_rate", "1e-3", "--checkpointing_steps", "2"]
cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
       str(args.num_processes), "--num_machines", "1", "--dynamo_backend", "no",
       "--mixed_precision", "no",
       *(["--multi_gpu"] if args.num_processes > 1 else []),
       str(ROOT / "scripts" / "train_lora.py"), *model, "--train_data_dir", str(data),
       "--output_dir", out, "--attention_backend", args.backend, "--seed", "0",
       *defaults, *args.rest]
print(" ".join(cmd))
sys.exit(subprocess.call(cmd))

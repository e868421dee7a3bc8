# The two commands of the README. Each sets up .venv first (seconds when already set up).
.PHONY: setup serve test demo-models eval

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/vas-server serve $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

# The shipped demo value models (docs/TRAINING.md): sample the embedded SmolLM2 on chitchat train
# prompts, score, and fit three token heads on a frozen 6-layer base_prefix trunk. About 20 minutes
# on a 2-core CPU. Intermediate data goes to build/demo/ (ignored by git).
DEMO_MODEL := value_models/demo/smollm2
DEMO_DATA := build/demo/train.jsonl

demo-models: setup
	.venv/bin/vas-train sample --chitchat train --num-prompts 2000 --samples-per-prompt 2 --max-tokens 40 \
		--dtype bfloat16 --max-model-len 512 --seed 0 --out $(DEMO_DATA)
	.venv/bin/vas-train score $(DEMO_DATA) --reward positive --reward concise --reward simple
	.venv/bin/vas-train fit $(DEMO_DATA) --head positive:token --head concise:token --head simple:token \
		--num-layers 6 --epochs 3 --batch-size 32 --lr 1e-3 --seed 0 --checkpoint-every 0 --out $(DEMO_MODEL)

# The evaluation of docs/QUALITY.md (VAS vs Best-of-N on 200 held-out prompts; about 30 minutes
# on a 2-core CPU). Writes eval.json, eval.md and PNG plots to docs/quality/.
eval: setup
	.venv/bin/vas-train eval $(DEMO_MODEL) --num-prompts 200 --max-tokens 40 --max-num-seqs 128 --out docs/quality

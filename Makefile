# The two commands of the README. Each sets up .venv first (seconds when already set up).
.PHONY: setup serve test demo-models eval

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/vas-server serve $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

# The shipped demo value models (docs/TRAINING.md): sample the embedded SmolLM2 on chitchat train
# prompts (three runs: the second and third add responses 2-3 and 4-5 of the same prompts, each with
# its own seed), score, and fit three token heads on a frozen 6-layer base_prefix trunk. About 2 hours
# 15 minutes on an idle 2-core CPU. Intermediate data goes to build/demo/ (ignored by git).
# The shipped model and docs/quality were made in bfloat16 on a CPU with native bfloat16. On an x86
# CPU without AVX512-BF16 or AMX bfloat16 is emulated and sampling runs 3-5x slower than in
# float32 (docs/BENCHMARKS.md): there, `make demo-models DTYPE=float32` (same distribution, other
# rounding, so other samples and Best-of-N sets than the shipped ones).
DTYPE ?= bfloat16
DEMO_MODEL := vas_server/demo/smollm2
# No top-K recorded: the demo fit holds nothing out (--validation-fraction 0), so the steering
# proxy's data would only make the 48,000 records ~11x larger (docs/TRAINING.md, Samples).
DEMO_SAMPLE := .venv/bin/vas-train sample --chitchat train --num-prompts 8000 --samples-per-prompt 2 --max-tokens 32 \
	--dtype $(DTYPE) --max-model-len 512 --seed 0 --record-top-k 0

demo-models: setup
	$(DEMO_SAMPLE) --out build/demo/train32.jsonl
	$(DEMO_SAMPLE) --first-sample 2 --out build/demo/more32.jsonl
	$(DEMO_SAMPLE) --first-sample 4 --out build/demo/ext32.jsonl
	.venv/bin/vas-train score build/demo/train32.jsonl --reward positive --reward concise --reward simple
	.venv/bin/vas-train score build/demo/more32.jsonl --reward positive --reward concise --reward simple
	.venv/bin/vas-train score build/demo/ext32.jsonl --reward positive --reward concise --reward simple
	.venv/bin/vas-train fit build/demo/train32.jsonl build/demo/more32.jsonl build/demo/ext32.jsonl \
		--head positive:token --head concise:token --head simple:token --num-layers 6 --lam 1.0 --epochs 3 \
		--batch-size 32 --lr 1e-3 --token-proj-lr 2e-6 --lr-decay linear --seed 0 --checkpoint-every 0 \
		--states-cache build/demo/states --default-top-k 256 --validation-fraction 0 --out $(DEMO_MODEL)

# The evaluation of docs/QUALITY.md: VAS at weights -2..8 per head and a 3x3 two-head grid on 200
# held-out prompts, against Best-of-4 (200 prompts), Best-of-16 (first 50) and Best-of-64 (first 20);
# 32 new tokens, at the spec's VAS top-K 20; then the same at top-K 256, the shipped model's own
# default (vas.json's default_top_k; weights 1.5..3, no grid; it reuses the first run's base
# samples). About 30 minutes on an idle 2-core CPU with native bfloat16. Full output (and the saved
# generations, which let an interrupted run resume) in build/eval/ and build/eval_k256/; the
# reports (and the first run's plots) are copied to docs/quality/.
EVAL := .venv/bin/vas-train eval $(DEMO_MODEL) --num-prompts 200 --max-tokens 32 --bon 4,16,64 --bon-prompts 200,50,20 \
	--max-num-seqs 200 --dtype $(DTYPE)

eval: setup
	$(EVAL) --top-k 20 --out build/eval
	mkdir -p docs/quality && cp build/eval/eval.json build/eval/eval.md build/eval/*.png docs/quality/
	$(EVAL) --top-k 256 --weights 1.5,2,2.2,2.5,3 --grid-weights 0 --generations build/eval/generations --out build/eval_k256
	mkdir -p docs/quality/k256 && cp build/eval_k256/eval.json build/eval_k256/eval.md docs/quality/k256/

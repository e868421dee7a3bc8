# The two commands of the README. Each sets up .venv first (seconds when already set up).
.PHONY: setup serve test

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/vas-server serve $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

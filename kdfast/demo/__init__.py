"""`kdfast distill`: an end-to-end distillation run on the CPU (corpus, tokenizer, cached teacher, two students,
report). See `kdfast.demo.main`."""

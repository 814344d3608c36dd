"""kdfast inside existing trainers. Each submodule imports its framework on import, so `import kdfast` never
needs them: `kdfast.integrations.transformers` (a `transformers.Trainer` for distillation) and
`kdfast.integrations.trl` (TRL's GKD loss and trainer backed by kdfast)."""

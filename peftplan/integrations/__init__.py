"""Ready pieces for other libraries' training loops: `transformers` (the Hugging Face `Trainer`)
and `trl` (TRL's ``SFTTrainer``)."""

"""Ready pieces for other libraries' training loops: `transformers` (the Hugging Face `Trainer`)."""

"""Training: data sets, models, the trainer and parent–child spawning."""

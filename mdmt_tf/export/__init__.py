"""SavedModel export shared by mdmt train and the pipeline's Trainer."""

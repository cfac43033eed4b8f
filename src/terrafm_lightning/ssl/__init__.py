"""Self-supervised pretraining: DINO head, loss, centring, schedules, EMA and the module."""

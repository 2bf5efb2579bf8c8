"""One run, top to bottom: validate the config, evaluate conditions, detect, test, log."""

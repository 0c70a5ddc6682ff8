"""The file layouts of each kind of checkpoint (model, optimizer, LR scheduler), and detecting what a path holds."""

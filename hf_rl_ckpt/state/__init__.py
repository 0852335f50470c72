"""One module per kind of training state; each writes pickle-free files and reads them back."""

"""`mrcnn`, the command line: argument parsing only; the one part of trainer/ that may import
`pipeline`."""

"""Models: the built-in classifiers, causal language models, the translation transformer, and the resolution of a
user's model (a factory, torchvision, timm, Hugging Face) into a module that takes flat rows."""

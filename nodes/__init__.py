"""ComfyUI glue: node schemas and the hooks that route a model's blocks through Chipmunk."""

from .accelerate import ChipmunkAccelerate
from .toy import ChipmunkToyPrompt

NODES = [ChipmunkAccelerate, ChipmunkToyPrompt]

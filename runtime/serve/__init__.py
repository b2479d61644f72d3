"""The OpenAI-compatible server (llava-serve): chat completions over an exported artifact folder,
with the images of user messages given as image_url parts (data URLs always; local files and
remote URLs only where the operator allows them, see runtime.serve.media)."""

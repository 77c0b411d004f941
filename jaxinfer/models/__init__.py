"""Model families. Each family is one module; `llama` covers Llama, Mistral and Qwen2."""

"""The model layer: the `Backend` boundary and what runs a model behind it.

`backend` is the interface (`Generation`, `PreparedPrompt`); `local` is the in-process
llama.cpp engine (slots, batching, KV reuse) with its vocabulary (`vocab`), disk tier
(`kvdisk`) and images (`vision`, libmtmd beside the model); `remote` sends the same work to an OpenAI-compatible server
(`RemoteModels`: its /v1/models chosen per conversation). Several local models: `pool` loads
them on demand within MODEL_MEMORY_MB (sizes read from the file by `ggufmeta`), their engines
taking turns on the CPU through `gate`. Nothing here
knows of conversations, the store or Discord."""

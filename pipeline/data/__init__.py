"""Images and where they live: decoding and normalising images (`images`), ingesting a
corpus into WebDataset shards (`ingest`, `shards`), the manifest that gives every image its
global index (`manifest`), the bundled sample corpus (`sample_corpus`) and background
prefetching (`prefetch`). Imports only the top level of `pipeline` (config, storage, errors).
"""

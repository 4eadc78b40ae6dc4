"""Images, folders and splits: everything before a network sees a tensor."""

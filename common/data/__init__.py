"""images, folders, splits: everything before a network sees a tensor."""

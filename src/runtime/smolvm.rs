//! The production runtime: the real `smolvm` CLI, driven through duct.

"""The measured VM image: its build (``build``), its definition (``profile``) and boots
under QEMU (``qemu``). The definition lives as data in the checkout's ``image/``."""

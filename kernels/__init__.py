"""fastlm's Triton kernels (installed as fastlm.kernels), one module per op family: kernels, then their
launchers (tensor in, tensor out). No autograd and no dispatch here: that is fastlm.ops."""

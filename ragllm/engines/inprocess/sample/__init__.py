"""From a step's logits to its tokens: grammar masks (``masks``, bounded by ``mask_watch``, applied on
the device by ``mask_kernel``), the choice under each row's sampling parameters (``choice``) and the
log probabilities asked for (``logprobs``)."""

"""sam-med2d_b.pth's parameter names and shapes, as the reference's `build_sam_vit_b` makes them."""


def med2d_keys(depth, dim, mlp, out, grid, window, global_idx, emb=16, dec_mlp=32):
    """sam-med2d_b.pth key names and shapes as the reference's `build_sam_vit_b` makes them (here at reduced sizes)."""
    hd = dim // 4
    keys = {'image_encoder.patch_embed.proj.weight': (dim, 3, 16, 16), 'image_encoder.patch_embed.proj.bias': (dim,),
            'image_encoder.pos_embed': (1, grid, grid, dim), 'image_encoder.neck.0.weight': (out, dim, 1, 1),
            'image_encoder.neck.1.weight': (out,), 'image_encoder.neck.1.bias': (out,),
            'image_encoder.neck.2.weight': (out, out, 3, 3), 'image_encoder.neck.3.weight': (out,),
            'image_encoder.neck.3.bias': (out,)}
    for i in range(depth):
        b = f'image_encoder.blocks.{i}.'
        size = grid if i in global_idx else window
        keys.update({b + 'norm1.weight': (dim,), b + 'norm1.bias': (dim,), b + 'norm2.weight': (dim,),
                     b + 'norm2.bias': (dim,), b + 'attn.qkv.weight': (3 * dim, dim), b + 'attn.qkv.bias': (3 * dim,),
                     b + 'attn.proj.weight': (dim, dim), b + 'attn.proj.bias': (dim,),
                     b + 'attn.rel_pos_h': (2 * size - 1, hd), b + 'attn.rel_pos_w': (2 * size - 1, hd),
                     b + 'mlp.lin1.weight': (mlp, dim), b + 'mlp.lin1.bias': (mlp,), b + 'mlp.lin2.weight': (dim, mlp),
                     b + 'mlp.lin2.bias': (dim,), b + 'Adapter.norm.weight': (dim,), b + 'Adapter.norm.bias': (dim,),
                     b + 'Adapter.channel.0.weight': (dim // 4, dim), b + 'Adapter.channel.2.weight': (dim, dim // 4),
                     b + 'Adapter.spatial.0.weight': (dim, dim, 3, 3),
                     b + 'Adapter.spatial.2.weight': (dim, dim, 4, 4)})
    pe = 'prompt_encoder.'
    keys.update({pe + 'pe_layer.positional_encoding_gaussian_matrix': (2, emb // 2),
                 pe + 'no_mask_embed.weight': (1, emb), pe + 'not_a_point_embed.weight': (1, emb),
                 **{f'{pe}point_embeddings.{i}.weight': (1, emb) for i in range(4)},
                 pe + 'mask_downscaling.0.weight': (1, 1, 2, 2), pe + 'mask_downscaling.0.bias': (1,),
                 pe + 'mask_downscaling.1.weight': (1,), pe + 'mask_downscaling.1.bias': (1,),
                 pe + 'mask_downscaling.3.weight': (4, 1, 2, 2), pe + 'mask_downscaling.3.bias': (4,),
                 pe + 'mask_downscaling.4.weight': (4,), pe + 'mask_downscaling.4.bias': (4,),
                 pe + 'mask_downscaling.6.weight': (emb, 4, 1, 1), pe + 'mask_downscaling.6.bias': (emb,)})
    md = 'mask_decoder.'
    keys.update({md + 'iou_token.weight': (1, emb), md + 'mask_tokens.weight': (4, emb),
                 md + 'output_upscaling.0.weight': (emb, emb // 4, 2, 2), md + 'output_upscaling.0.bias': (emb // 4,),
                 md + 'output_upscaling.1.weight': (emb // 4,), md + 'output_upscaling.1.bias': (emb // 4,),
                 md + 'output_upscaling.3.weight': (emb // 4, emb // 8, 2, 2),
                 md + 'output_upscaling.3.bias': (emb // 8,),
                 md + 'transformer.norm_final_attn.weight': (emb,), md + 'transformer.norm_final_attn.bias': (emb,)})
    attn = lambda pre, inner: {f'{pre}.{p}.{w}': ((inner if p != 'out_proj' else emb, emb if p != 'out_proj' else inner)  # noqa: E731
                                                 if w == 'weight' else (inner if p != 'out_proj' else emb,))
                               for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj') for w in ('weight', 'bias')}
    for i in range(2):
        lt = f'{md}transformer.layers.{i}.'
        keys.update(attn(lt + 'self_attn', emb))
        keys.update(attn(lt + 'cross_attn_token_to_image', emb // 2))
        keys.update(attn(lt + 'cross_attn_image_to_token', emb // 2))
        keys.update({lt + f'norm{j}.{w}': (emb,) for j in range(1, 5) for w in ('weight', 'bias')})
        keys.update({lt + 'mlp.lin1.weight': (dec_mlp, emb), lt + 'mlp.lin1.bias': (dec_mlp,),
                     lt + 'mlp.lin2.weight': (emb, dec_mlp), lt + 'mlp.lin2.bias': (emb,)})
    keys.update(attn(md + 'transformer.final_attn_token_to_image', emb // 2))
    for head, n_out in [(f'output_hypernetworks_mlps.{m}', emb // 8) for m in range(4)] + [('iou_prediction_head', 4)]:
        for j, (o, i_) in enumerate(((emb, emb), (emb, emb), (n_out, emb))):
            keys.update({f'{md}{head}.layers.{j}.weight': (o, i_), f'{md}{head}.layers.{j}.bias': (o,)})
    return keys

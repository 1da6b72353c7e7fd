//! Weight shapes of well-known models, for the examples and benchmarks.

/// The 53 convolution weight shapes of torchvision's ResNet-50, `[out, in, kh, kw]`, in
/// forward order: the stem, then per bottleneck block its 1x1, 3x3 and 1x1 convolutions,
/// and the 1x1 downsample of each stage's first block.
pub fn resnet50_conv_weights() -> Vec<[usize; 4]> {
    let mut shapes = vec![[64, 3, 7, 7]];
    let mut in_ch = 64;
    for (width, blocks) in [(64, 3), (128, 4), (256, 6), (512, 3)] {
        for block in 0..blocks {
            shapes.push([width, in_ch, 1, 1]);
            shapes.push([width, width, 3, 3]);
            shapes.push([width * 4, width, 1, 1]);
            if block == 0 {
                shapes.push([width * 4, in_ch, 1, 1]);
            }
            in_ch = width * 4;
        }
    }
    shapes
}

#[cfg(test)]
mod tests {
    #[test]
    fn resnet50_has_53_convolutions_and_23_5m_weights() {
        let shapes = super::resnet50_conv_weights();
        assert_eq!(shapes.len(), 53);
        let params: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        // torchvision's ResNet-50 has 25.56M parameters, of which 23.45M are convolutions.
        assert_eq!(params, 23_454_912);
    }
}

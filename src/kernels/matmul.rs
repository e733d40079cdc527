pub fn bf16_dot_available() -> bool {
    false
}
pub fn matmul() {}

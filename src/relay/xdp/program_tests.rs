use super::*;
#[test]
fn loads() {
    let mut l = Loaded::load().unwrap();
    let fd = l.program_fd().unwrap();
    let (rc, _) = maps::test_run(&fd, &[0u8; 64], 1).unwrap();
    assert_eq!(rc, 2);
}

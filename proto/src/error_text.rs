//! One line for an error and its causes, for a terminal or a log.

/// The error and its chain of sources joined by ": ". A cause whose text the line already
/// holds is left out: lockstep's errors name their source in their own message (as
/// `"{path}: {source}"`) and also expose it as `source()`, so a plain join would say it twice.
pub fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("reading /data/x: {0}")]
        Says(#[source] std::io::Error),
        #[error("loading the model")]
        Hides(#[source] std::io::Error),
    }

    #[test]
    fn a_cause_is_named_once_whether_or_not_the_message_holds_it() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(error_text(&Outer::Says(io())), "reading /data/x: no such file");
        assert_eq!(error_text(&Outer::Hides(io())), "loading the model: no such file");
    }
}

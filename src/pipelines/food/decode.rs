//! Decoding the food events on topic `message`: `{"food": "<name>"}`, unkeyed.

use serde::Deserialize;

use crate::error::DecodeError;
use crate::sources::decode::{reject_array, Decoded, Decoder, Metadata};

/// Longest food name accepted; longer ones are dead-lettered as absurd.
pub const MAX_FOOD_LEN: usize = 256;

/// Decodes a food event to its food name.
#[derive(Default)]
pub struct FoodDecoder;

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    food: Option<&'a serde_json::value::RawValue>,
}

/// Decodes one event's value to its food name.
pub fn decode_food(value: Option<&[u8]>) -> Result<String, DecodeError> {
    let value = value.ok_or(DecodeError::MissingField("value"))?;
    reject_array(value)?;
    let event: Event<'_> = serde_json::from_slice(value).map_err(DecodeError::from_json)?;
    let raw = event.food.ok_or(DecodeError::MissingField("food"))?;
    let food: String = match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => s,
        Err(_) => return Err(DecodeError::WrongType("food")),
    };
    let food = food.trim();
    if food.is_empty() {
        return Err(DecodeError::Invalid("empty food".into()));
    }
    if food.len() > MAX_FOOD_LEN {
        return Err(DecodeError::Invalid(format!("food name of {} bytes", food.len())));
    }
    Ok(food.to_owned())
}

impl Decoder for FoodDecoder {
    type Out = String;

    fn decode(
        &mut self,
        _key: Option<&[u8]>,
        value: Option<&[u8]>,
        _meta: &Metadata<'_>,
    ) -> Result<Decoded<String>, DecodeError> {
        decode_food(value).map(Decoded::Record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_and_bad_events() {
        assert_eq!(decode_food(Some(br#"{"food": "pie"}"#)).unwrap(), "pie");
        assert_eq!(
            decode_food(Some(br#"{"food":"foie-gras","extra":1}"#)).unwrap(),
            "foie-gras"
        );
        let reason = |v: &[u8]| decode_food(Some(v)).unwrap_err().reason();
        assert_eq!(reason(b"\xff\xfe"), "malformed");
        assert_eq!(reason(b"{\"food\": \"pie\""), "truncated");
        assert_eq!(reason(b"{\"drink\": \"tea\"}"), "missing_field");
        assert_eq!(reason(b"{\"food\": 42}"), "wrong_type");
        assert_eq!(reason(b"{\"food\": null}"), "missing_field");
        assert_eq!(reason(b"{\"food\": \"  \"}"), "invalid");
        assert_eq!(
            reason(format!("{{\"food\": \"{}\"}}", "x".repeat(300)).as_bytes()),
            "invalid"
        );
        assert_eq!(reason(b"[\"pie\"]"), "shape");
        assert_eq!(decode_food(None).unwrap_err().reason(), "missing_field");
    }
}
